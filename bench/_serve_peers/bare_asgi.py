"""The ceiling: a raw ASGI app (no framework) answering one constant JSON to any request.

Run: uvicorn bare_asgi:app --workers 2 --no-access-log --lifespan off
"""

BODY = b'{"probabilities":[[0.5,0.5]]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the whole request body, as a real server must
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
