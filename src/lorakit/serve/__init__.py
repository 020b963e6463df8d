"""``lorakit serve``: one frozen base, many adapters, an OpenAI-compatible HTTP server.

``engine``: the continuous-batching loop that owns the model; ``batch``: the running rows'
key/value cache; ``store``: which adapters exist and which are in memory; ``schemas``: request
bodies; ``responses``: OpenAI's response shapes; ``app``: the FastAPI routes; ``metrics``;
``server``: building and running it all. FastAPI, uvicorn and pydantic come with the ``serve``
extra; nothing here is imported by ``import lorakit``.
"""
