"""Everything that turns text into weights: tokenizer, data pipeline and trainer."""
