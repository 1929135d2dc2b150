"""Serve with `states_dir` in a bucket (moto's S3 server on 127.0.0.1): the registry keeps no state of its own, so
a second application started after an upload (a fresh registry and model replica: what a restart, or a replica
on another node, starts with) and running beside the first serves every uploaded, blended or published state.
One real Ray Serve instance for the module, driven over HTTP."""
import base64
import json
import os

import httpx
import pytest

from rwkvray.errors import UserError
from rwkvray.files import storage
from rwkvray.model.checkpoint import save_checkpoint
from rwkvray.model.tuned_state import blend
from rwkvray.serve.api import ApiError
from rwkvray.serve.states import StateStore
from rwkvray.spec import spec_from_dict
from tests.helpers import SAMPLE, free_port
from tests.test_serve_units import PROMPTS, SERVE_DIMS, random_state, reference_text, serve_model, state_bytes

pytestmark = pytest.mark.ray

STATES = "s3://runs/serve-states"
BASE = "tiny-rwkv"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def aws(s3_server):
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # before Ray starts: the registry replicas read the bucket with them
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class Cluster:
    """One Ray Serve instance; applications named by their route prefix, each with its own registry."""

    def __init__(self, port: int, model_path: str, model):
        self.port = port
        self.model_path = model_path
        self.model = model
        self.apps: set[str] = set()

    def config(self, **fields):
        serve = {"model": self.model_path, "states_dir": STATES, "max_batch_size": 4, "batch_wait_ms": 5.0,
                 "max_tokens_cap": 16, "default_max_tokens": 8, "max_upload_mb": 0.25, "use_gpu": False,
                 "num_cpus": 1, **fields}  # two applications share the 2-CPU instance
        return spec_from_dict({"serve": serve}, "serve.yaml")

    def client(self, app: str) -> httpx.Client:
        """A client of the application `app`, deployed on first use."""
        if app not in self.apps:
            from ray import serve
            from rwkvray.serve.app import build_app
            serve.run(build_app(self.config().serve, None), name=app, route_prefix=f"/{app}")
            self.apps.add(app)
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}/{app}", timeout=120)

    def text(self, app: str, model: str, prompt: str = PROMPTS[2]) -> str:
        with self.client(app) as client:
            answer = client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                          "max_tokens": MAX_TOKENS, "temperature": 0})
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def cluster(aws, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve
    from rwkvray.launch.serving import start_serve
    model = serve_model()
    model_path = str(tmp_path_factory.mktemp("s3serve") / f"{BASE}.pth")
    save_checkpoint(model.state_dict(), model_path)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()  # after Ray is up: its processes bind ephemeral ports too
    try:
        start_serve("127.0.0.1", port)
        yield Cluster(port, model_path, model)
    finally:
        serve.shutdown()
        ray.shutdown()


def upload(client: httpx.Client, name: str, data: bytes, **fields) -> httpx.Response:
    return client.post("/v1/states", json={"name": name, "data": base64.b64encode(data).decode(), **fields})


def test_an_upload_lands_in_the_bucket_and_a_fresh_app_beside_the_first_serves_it(cluster):
    expected = reference_text(cluster.model, PROMPTS[2], random_state(1), MAX_TOKENS)
    card = {"method": "state", "note": "uploaded to one"}
    with cluster.client("one") as client:
        assert upload(client, "persona", state_bytes(random_state(1)), card=card).status_code == 200
    assert storage.read_bytes(f"{STATES}/persona.pth") == state_bytes(random_state(1))  # the object, whole
    assert json.loads(storage.read_bytes(f"{STATES}/persona.json")) == card
    assert cluster.text("one", "persona") == expected
    with cluster.client("two") as client:  # started now, with nothing in memory: it reads the bucket
        assert "persona" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert client.get("/v1/states/persona").json()["card"] == card
    assert cluster.text("two", "persona") == expected
    assert cluster.text("one", "persona") == expected  # and the first still serves it beside the second


def test_a_blend_and_its_card_land_in_the_bucket_and_replacing_keeps_the_previous(cluster):
    with cluster.client("one") as client:
        assert upload(client, "alpha", state_bytes(random_state(2))).status_code == 200
        taken = upload(client, "alpha", state_bytes(random_state(3)))
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "state_exists"
        assert storage.read_bytes(f"{STATES}/alpha.pth") == state_bytes(random_state(2))  # untouched
        assert upload(client, "alpha", state_bytes(random_state(3)), replace=True).status_code == 200
        blended = client.post("/v1/states", json={"name": "mix", "blend": {"alpha": 0.5, "alpha.prev": 0.5}})
        assert blended.status_code == 200, blended.text
    assert storage.read_bytes(f"{STATES}/alpha.prev.pth") == state_bytes(random_state(2))
    card = json.loads(storage.read_bytes(f"{STATES}/mix.json"))
    assert card["method"] == "blend" and card["blend"] == {"alpha": 0.5, "alpha.prev": 0.5}
    mix = blend([(0.5, random_state(3)), (0.5, random_state(2))])
    assert cluster.text("two", "mix") == reference_text(cluster.model, PROMPTS[2], mix, MAX_TOKENS)


def test_a_state_published_by_a_run_spec_into_the_bucket_is_mounted_by_name(cluster):
    from rwkvray.launch.outputs import publish_final
    from rwkvray.model.state_card import base_fingerprint, card_bytes
    spec = spec_from_dict({"model": {"path": cluster.model_path}, "data": {"file": SAMPLE},
                           "run": {"name": "s3-publish", "storage_path": "s3://runs/jobs",
                                   "publish": {"states_dir": STATES, "name": "published"}}}, "job.yaml")
    run = storage.run_dir(spec)  # as the run leaves its final state in run storage
    storage.write_bytes(f"{run}/rwkv-final.pth", state_bytes(random_state(4)))
    storage.write_bytes(f"{run}/rwkv-final.json", card_bytes({"base": base_fingerprint(cluster.model_path)}))
    publish_final(spec)
    with cluster.client("two") as client:
        mounted = client.post("/v1/states", json={"name": "published"}).json()
    assert mounted["source"] == "states_dir" and mounted["base_match"] is True and "warning" not in mounted
    assert cluster.text("two", "published") == reference_text(cluster.model, PROMPTS[2], random_state(4),
                                                               MAX_TOKENS)


def test_names_in_a_bucket_are_checked_as_strictly_as_on_disk(aws):
    storage.write_bytes(f"{STATES}-strict/.hidden.pth", state_bytes(random_state(5)))
    storage.write_bytes(f"{STATES}-strict/sub/inner.pth", state_bytes(random_state(5)))
    store = StateStore(f"{STATES}-strict", SERVE_DIMS, BASE, max_upload_bytes=2**20)
    for name in ("../serve-states/persona", ".hidden", "sub/inner", ".."):
        with pytest.raises(ApiError) as refused:
            store.resolve(name)
        assert refused.value.status == 400 and refused.value.code == "invalid_state_name", name
    assert store.known_names() == []
    store.upload("ok", state_bytes(random_state(5)))
    assert store.known_names() == ["ok"]


def test_a_missing_bucket_is_one_line_naming_the_key_before_serving_or_training(aws, tmp_path):
    from rwkvray.launch.outputs import check_publishable
    from rwkvray.launch.prechecks import before_serving
    model_path = str(tmp_path / "m.pth")
    save_checkpoint(serve_model().state_dict(), model_path)
    spec = spec_from_dict({"serve": {"model": model_path, "states_dir": "s3://no-such-bucket/states",
                                     "port": free_port()}}, "serve.yaml")
    with pytest.raises(UserError) as err:
        before_serving(spec, "local")
    assert str(err.value) == ("serve.yaml: serve.states_dir: cannot use s3://no-such-bucket/states: the bucket "
                              "'no-such-bucket' does not exist")
    run = spec_from_dict({"model": {"path": model_path}, "data": {"file": SAMPLE},
                          "run": {"publish": {"states_dir": "s3://no-such-bucket/states", "name": "p"}}}, "job.yaml")
    with pytest.raises(UserError) as err:
        check_publishable(run)
    assert str(err.value) == ("job.yaml: run.publish.states_dir: cannot use s3://no-such-bucket/states: the bucket "
                              "'no-such-bucket' does not exist")
