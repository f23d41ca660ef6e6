"""Online retrieval service: the live retriever behind HTTP, with dynamic batching and hot reload.

settings (the `serve:` params block) -> versions (a loaded model version, reloaded on promotion)
-> engine (answers a batch of requests on one version, exactly as `retrieve` would) ->
batching (collects concurrent requests into one decode) -> app (FastAPI routes and errors) ->
server (`serve`, uvicorn). `request_log` writes what was answered for the A/B analysis.
"""
