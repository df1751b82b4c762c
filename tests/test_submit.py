"""`calm submit`, the example 70B config and the KubeRay manifest, all without a cluster."""

from __future__ import annotations

import json
import re
import shlex
import socket
from pathlib import Path

import pytest
import yaml

from calm_dist.model.connections import every_n
from launcher import cli
from launcher.preflight import parse_address
from launcher.submit.command import build_job_request
from launcher.train_config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def calm(monkeypatch):
    """launcher.cli.main with the submit subcommand registered, whether or not cli.py lists it yet."""
    monkeypatch.setitem(cli.SUBCOMMANDS, "submit", ("launcher.submit.command", "submit a training config as a Ray job"))

    def main(*argv: str) -> int:
        with pytest.raises(SystemExit) as info:
            cli.main(list(argv))
        return info.value.code

    return main


@pytest.fixture
def listening_port():
    """A port on which something accepts TCP connections, standing in for a cluster's dashboard."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def write_config(folder: Path, runtime_env: dict | None = None, models: Path | None = None) -> Path:
    models = models or folder / "models"
    raw = {
        "name": "tiny",
        "models": {"anchor": {"path": str(models / "anchor")}, "augmenting": [{"path": str(models / "aug")}]},
        "composition": {"every_n": 2},
        "data": {"train": "train.jsonl", "text_field": "text"},
        "training": {"steps": 2, "micro_batch_size": 1, "global_batch_size": 2},
        "ray": {"runtime_env": runtime_env or {}},
    }
    path = folder / "configs" / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    (path.parent / "train.jsonl").write_text("".join(json.dumps({"text": f"{i}+1"}) + "\n" for i in range(4)))
    return path


# --------------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(("address", "expected"), [
    ("ray://head:10001", ("head", 10001)),
    ("http://10.0.0.5:8265", ("10.0.0.5", 8265)),
    ("https://ray.example.com", ("ray.example.com", 443)),
    ("ray://head", ("head", 10001)),
    ("head:6380", ("head", 6380)),
    ("head", ("head", 6379)),
    ("http://[::1]:8265/", ("::1", 8265)),
])
def test_addresses_parse_to_host_and_port(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["http://head:port", "http://head:8265/api", "http://:8265", "head:99999"])
def test_malformed_addresses_are_refused_naming_ray_address(address):
    with pytest.raises(ConfigError, match=re.escape(f"ray.address: {address!r} is not an address of the form")):
        parse_address(address)


# --------------------------------------------------------------------------------------------------
# The job request


def test_the_job_request_runs_train_on_the_uploaded_config(tmp_path):
    config_path = write_config(tmp_path, {"env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": ["*.bin"],
                                          "working_dir": "s3://ignored.zip"})
    config = load_config(config_path)
    request = build_job_request(config_path, "http://head:8265", tmp_path, config)
    assert request["address"] == "http://head:8265"
    assert request["entrypoint"] == "python -m launcher.cli train configs/tiny.yaml --set ray.address=auto"
    assert request["runtime_env"] == {
        "env_vars": {"HF_HUB_OFFLINE": "1"},
        "working_dir": str(tmp_path.resolve()),
        "excludes": ["*.bin", ".venv", "runs", ".git"],
    }
    assert request["metadata"] == {"calm_config": "configs/tiny.yaml", "calm_name": "tiny"}
    assert config.ray.runtime_env["working_dir"] == "s3://ignored.zip"  # the config is not mutated
    argv = shlex.split(request["command_line"])
    assert argv[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    # The printed command names the environment variables, never their values (the job gets them).
    assert argv[5] == "--runtime-env-json"
    assert json.loads(argv[6]) == {**request["runtime_env"], "env_vars": {"HF_HUB_OFFLINE": "<set>"}}
    assert argv[7:] == ["--", *shlex.split(request["entrypoint"])]


def test_a_config_path_with_spaces_is_quoted(tmp_path):
    config_path = write_config(tmp_path / "my project")
    request = build_job_request(config_path, "http://head:8265", tmp_path, load_config(config_path))
    assert request["entrypoint"] == (
        "python -m launcher.cli train 'my project/configs/tiny.yaml' --set ray.address=auto")
    assert shlex.split(request["command_line"])[-3:] == ["my project/configs/tiny.yaml", "--set", "ray.address=auto"]


def test_a_config_outside_the_working_dir_is_refused(tmp_path):
    config_path = write_config(tmp_path / "elsewhere")
    (tmp_path / "work").mkdir()
    with pytest.raises(ConfigError) as info:
        build_job_request(config_path, "http://head:8265", tmp_path / "work", load_config(config_path))
    assert str(info.value).startswith(f"{config_path}: the config lies outside --working-dir {tmp_path / 'work'}")


def test_a_missing_working_dir_is_refused(tmp_path):
    config_path = write_config(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"--working-dir {tmp_path / 'nope'}: no such folder")):
        build_job_request(config_path, "http://head:8265", tmp_path / "nope", load_config(config_path))


# --------------------------------------------------------------------------------------------------
# The command


def test_an_unreachable_address_exits_2_naming_ray_address(tmp_path, calm, capsys):
    from calm_dist.testing.tiny_models import tiny_model
    from calm_dist.testing.tokenizers import tiny_tokenizer

    tiny_model("llama", layers=2, width=32, heads=2).save_pretrained(tmp_path / "models" / "anchor")
    tiny_tokenizer().save_pretrained(tmp_path / "models" / "anchor")
    tiny_model("llama", layers=2, width=16, heads=2).save_pretrained(tmp_path / "models" / "aug")
    config_path = write_config(tmp_path)
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert calm("submit", str(config_path), "--address", f"http://127.0.0.1:{port}",
                "--working-dir", str(tmp_path)) == 2
    assert (f"calm submit: error: ray.address (from --address http://127.0.0.1:{port} on the command line): "
            f"cannot reach 127.0.0.1:{port} (Connection refused)") in capsys.readouterr().err


def test_a_bad_config_exits_2_before_anything_is_contacted(tmp_path, calm, capsys):
    config_path = tmp_path / "bad.yaml"
    config_path.write_text("name: latest\n")
    assert calm("submit", str(config_path), "--address", "http://127.0.0.1:1") == 2
    assert f"calm submit: error: {config_path}: invalid config" in capsys.readouterr().err


class FakeClient:
    """JobSubmissionClient's calls that `calm submit` makes, recorded; the job ends as `final`."""

    final = "SUCCEEDED"
    instances: list[FakeClient] = []

    def __init__(self, address, headers=None):
        self.address, self.headers, self.submitted = address, headers, None
        FakeClient.instances.append(self)

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return "raysubmit_test123"

    async def tail_job_logs(self, job_id):
        for line in ("step 1 loss 4.2\n", "step 2 loss 3.9\n"):
            yield line

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus(self.final)


@pytest.mark.parametrize(("final", "code"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_follows_the_logs_and_exits_with_the_job(tmp_path, calm, capsys, monkeypatch, listening_port,
                                                        final, code):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(FakeClient, "final", final)
    monkeypatch.setattr(FakeClient, "instances", [])
    config_path = write_config(tmp_path)
    address = f"http://127.0.0.1:{listening_port}"
    assert calm("submit", str(config_path), "--address", address, "--working-dir", str(tmp_path),
                "--paths-on-cluster") == code
    (client,) = FakeClient.instances
    assert client.address == address
    assert client.submitted["entrypoint"] == "python -m launcher.cli train configs/tiny.yaml --set ray.address=auto"
    assert client.submitted["runtime_env"]["working_dir"] == str(tmp_path.resolve())
    out = capsys.readouterr().out
    assert f"equivalent command: ray job submit --address {address} --runtime-env-json " in out
    assert "submitted job raysubmit_test123\nstep 1 loss 4.2\nstep 2 loss 3.9\n" in out
    assert out.endswith(f"job raysubmit_test123: {final}\n")


def test_the_equivalent_command_shows_no_environment_values_but_the_job_gets_them(
        tmp_path, calm, capsys, monkeypatch, listening_port):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(FakeClient, "instances", [])
    config_path = write_config(tmp_path, {"env_vars": {"HF_TOKEN": "hf_secret123", "HF_HUB_OFFLINE": "1"}})
    address = f"http://127.0.0.1:{listening_port}"
    assert calm("submit", str(config_path), "--address", address, "--working-dir", str(tmp_path),
                "--paths-on-cluster", "--no-wait", "--set", "ray.runtime_env.env_vars.WANDB_API_KEY=wandb_secret456",
                "--set", "training.steps=3") == 0
    out = capsys.readouterr().out
    assert "hf_secret123" not in out and "wandb_secret456" not in out
    (line,) = [line for line in out.splitlines() if line.startswith("equivalent command: ")]
    argv = shlex.split(line.removeprefix("equivalent command: "))
    assert json.loads(argv[6])["env_vars"] == {"HF_TOKEN": "<set>", "HF_HUB_OFFLINE": "<set>", "WANDB_API_KEY": "<set>"}
    assert argv[-4:] == ["--set", "ray.runtime_env.env_vars.WANDB_API_KEY=<set>", "--set", "training.steps=3"]
    assert "(environment variables are shown as <set>, not by value: the job gets their values" in out
    (client,) = FakeClient.instances
    assert client.submitted["runtime_env"]["env_vars"] == {
        "HF_TOKEN": "hf_secret123", "HF_HUB_OFFLINE": "1", "WANDB_API_KEY": "wandb_secret456"}
    assert client.submitted["entrypoint"].endswith(
        "--set ray.runtime_env.env_vars.WANDB_API_KEY=wandb_secret456 --set training.steps=3")


def test_no_wait_returns_once_submitted(tmp_path, calm, capsys, monkeypatch, listening_port):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(FakeClient, "final", "FAILED")  # never asked: --no-wait does not follow the job
    monkeypatch.setattr(FakeClient, "instances", [])
    config_path = write_config(tmp_path)
    address = f"http://127.0.0.1:{listening_port}"
    assert calm("submit", str(config_path), "--address", address, "--working-dir", str(tmp_path),
                "--paths-on-cluster", "--no-wait") == 0
    out = capsys.readouterr().out
    assert "step 1" not in out
    assert out.endswith(f"follow it with: ray job logs --address {address} --follow raysubmit_test123\n")


# --------------------------------------------------------------------------------------------------
# The real-scale example and its KubeRay job


def test_the_70b_example_config_validates():
    """Its memory arithmetic is `calm plan`'s output now (tests/test_plan.py checks it)."""
    path = REPO / "configs" / "calm-70b-7b.yaml"
    config = load_config(path)  # its model paths exist only on the cluster: no preflight here
    assert (config.ray.num_workers, config.ray.use_gpu, config.deepspeed.zero_stage) == (16, True, 3)
    assert (config.models.anchor.dtype, config.models.augmenting[0].dtype, config.composition.dtype) == (
        "bfloat16", "bfloat16", "float32")
    # Anchor Llama-3.1-70B: 80 layers x 8192; augmenting Llama-3.1-8B family: 32 layers x 4096.
    connections = every_n(32, 80, config.composition.every_n)
    assert len(connections) == 8
    assert "calm plan" in path.read_text()


def test_the_kuberay_job_runs_the_example_on_16_gpus_with_shared_checkpoints():
    manifest = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    entrypoint = shlex.split(manifest["spec"]["entrypoint"])
    assert entrypoint == ["python", "-m", "launcher.cli", "train", "configs/calm-70b-7b.yaml"]
    config = load_config(REPO / entrypoint[-1])
    cluster = manifest["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert workers["replicas"] * int(container["resources"]["limits"]["nvidia.com/gpu"]) == config.ray.num_workers
    pods = [cluster["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]]
    for pod in pods:  # the driver (head) reads models and data too; every pod sees the same storage
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"] if m["name"] in claims]
        assert any(config.ray.storage_path.startswith(mount + "/") for mount in mounts)
        assert any(config.models.anchor.path.startswith(mount + "/") for mount in mounts)


def test_every_kuberay_container_runs_with_token_authentication_from_the_secret_the_comment_creates():
    """The dashboard listens on 0.0.0.0 and its Jobs API runs code: head, workers and the submitter all
    use Ray's token mode with the token from one Kubernetes Secret, the one the manifest says to create."""
    text = (REPO / "deploy" / "kuberay-rayjob.yaml").read_text()
    manifest = yaml.safe_load(text)
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"],
            "submitter": manifest["spec"]["submitterPodTemplate"]["spec"]}
    pods |= {f"workers {g['groupName']}": g["template"]["spec"] for g in cluster["workerGroupSpecs"]}
    (create,) = re.findall(r"kubectl create secret generic (\S+) --from-literal=(\w+)=", text)
    for role, pod in pods.items():
        assert pod["containers"], role
        for container in pod["containers"] + pod.get("initContainers", []):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, (role, container["name"])
            assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": {
                "secretKeyRef": {"name": create[0], "key": create[1]}}}, (role, container["name"])
    assert "RAY_AUTH_TOKEN" in (REPO / "README.md").read_text().split("deploy/kuberay-rayjob.yaml", 1)[1][:1500]
    assert f"kubectl create secret generic {create[0]}" in (REPO / "README.md").read_text()


def test_resume_and_overrides_reach_the_job(tmp_path):
    config_path = write_config(tmp_path)
    request = build_job_request(config_path, "http://head:8265", tmp_path, load_config(config_path),
                                ["--set", "training.steps=9", "--resume"])
    assert request["entrypoint"].endswith("--set ray.address=auto --set training.steps=9 --resume")
    assert request["command_line"].endswith("--set ray.address=auto --set training.steps=9 --resume")


def test_the_token_is_found_where_the_ray_cli_finds_it(tmp_path):
    from launcher.runtime.ray_auth import find_token

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert find_token({}, home) is None
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert (find_token({}, home).token, find_token({}, home).source) == ("from-home", str(home / ".ray/auth_token"))
    (tmp_path / "token").write_text("from-path")
    found = find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}, home)
    assert (found.token, found.source) == ("from-path", f"RAY_AUTH_TOKEN_PATH ({tmp_path / 'token'})")
    found = find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}, home)
    assert (found.token, found.headers()) == ("from-env", {"Authorization": "Bearer from-env"})
    # A path that is set but unusable is an error, as for Ray, not a reason to look further.
    with pytest.raises(ConfigError, match=f"RAY_AUTH_TOKEN_PATH: cannot read {tmp_path / 'none'}"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, home)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=f"RAY_AUTH_TOKEN_PATH: {tmp_path / 'empty'} is empty"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, home)
