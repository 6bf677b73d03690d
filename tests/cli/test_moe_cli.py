"""`minigrok train` of a mixture-of-experts model logs its router losses; export-hf and quantize refuse it."""

import json

from minigrok.cli import main


def test_a_moe_run_logs_router_losses_and_is_refused_by_export_and_quantize(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--tokenizer", "byte", "--out", str(run)]
    moe = ["model.n_experts=4", "model.experts_per_token=2", "model.moe_layers=DM", "model.moe_capacity_factor=1.25"]
    steps = ["train.max_steps=4", "train.log_every=2", "train.eval_every=4", "train.ckpt_every=4", "train.dtype=fp32"]
    sets = [flag for pair in moe + steps + ["train.activation_checkpointing=full"] for flag in ("--set", pair)]
    assert main(args + sets + ["--samples", "0"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps_logged = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps_logged] == [2, 4]
    for record in steps_logged:
        # unweighted: the balance loss is 1 for uniform routing, the z-loss about log(4)^2 for small logits
        assert 0.9 < record["moe_aux_loss"] < 2 and 1 < record["moe_z_loss"] < 4, record
    capsys.readouterr()
    assert main(["export-hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "n_experts=4: the Llama layout has dense MLPs only" in capsys.readouterr().err
    assert main(["quantize", "--checkpoint", str(run), "--bits", "8"]) == 2
    assert "n_experts=4: quantisation does not handle mixture-of-experts models" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
