"""`minigrok serve`: an OpenAI-compatible HTTP server (the `serve` extra: FastAPI and uvicorn) over a
continuous-batching engine. Nothing is imported here, so that `import minigrok` never loads the server."""
