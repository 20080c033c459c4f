"""The Router's ingress: a request to a subnet route goes straight to the replica's pipeline,
whatever its method (the pipeline answers 405 itself); every other path through FastAPI."""

from fastapi import FastAPI
from starlette.responses import Response
from starlette.testclient import TestClient

from serve_app.router.deployment import PipelineFirst


class Pipeline:
    routes = {"/v1/embeddings": "a route"}

    def __init__(self):
        self.seen = []

    async def handle(self, request, request_id="-"):
        self.seen.append((request.method, request.url.path, await request.body()))
        return Response(b'{"from":"pipeline"}', media_type="application/json")


def test_subnet_routes_skip_fastapi_and_the_rest_do_not():
    app = FastAPI()
    app.add_middleware(PipelineFirst)
    fastapi_saw = []

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def dispatch(path: str):
        fastapi_saw.append(path)
        return Response(b'{"from":"fastapi"}', media_type="application/json")

    client = TestClient(app)
    # A replica still starting has no pipeline yet: FastAPI answers everything.
    assert client.post("/v1/embeddings", content=b"{}").json() == {"from": "fastapi"}

    app.state.pipeline = pipeline = Pipeline()
    assert client.post("/v1/embeddings", content=b'{"input": "x"}').json() == {"from": "pipeline"}
    assert client.get("/v1/embeddings").json() == {"from": "pipeline"}
    assert pipeline.seen == [("POST", "/v1/embeddings", b'{"input": "x"}'), ("GET", "/v1/embeddings", b"")]
    assert client.get("/health").json() == {"from": "fastapi"}
    assert client.post("/v1/embeddingsx", content=b"{}").json() == {"from": "fastapi"}
    assert fastapi_saw == ["v1/embeddings", "health", "v1/embeddingsx"]
