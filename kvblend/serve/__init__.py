"""`kvblend serve`: an OpenAI-compatible chat-completions server that reuses chunk KV across requests.

Modules: protocol (request validation, response bodies; pure Python), metrics (Prometheus text), corpus
(server-side retrieval), worker (the one thread that owns the engine and the chunk store), app (FastAPI
routes), cli (flags, start-up). Importing this package does not import torch.
"""
