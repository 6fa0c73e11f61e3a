"""`zsclip serve`: a resident model behind an HTTP API, for programs that ask about images often.

    batcher.py   images from many requests -> one model thread, in batches (dynamic batching);
                 the text tower's own thread
    engine.py    the model at work: decoding threads, the batcher, cached label classifiers,
                 admission (a bounded queue); plain asyncio, no web framework
    schemas.py   the JSON shapes of requests and answers (pydantic: validation and the OpenAPI text)
    app.py       the HTTP API (FastAPI): routes, the token, size and time limits, JSON errors
    server.py    the listening socket and uvicorn, with a graceful stop on SIGTERM

Sits beside zsclip.train: it uses the jobs and the core, and only the terminal layer (zsclip.cli.serve)
imports it. Needs the optional extra: pip install 'zsclip[serve]'. How to run it: docs/serving.md.
"""
