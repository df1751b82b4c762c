"""`calm submit`: run a training config on a remote Ray cluster as a Ray job.

The job is `python -m launcher.cli train CONFIG --set ray.address=auto`, run on the cluster in an
uploaded copy of the working directory: what `ray job submit` would do, and the equivalent
`ray job submit` line is printed so the same submission can be scripted without this tool. The config
is checked here first, so a typo costs seconds rather than a cluster scheduling round.

The printed line names the runtime env's environment variables but never shows their values (an
HF_TOKEN would otherwise land in terminal scrollback and CI logs); the job itself gets the values.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from launcher.train_config import (
    ConfigError,
    TrainConfig,
    blamed_on_command_line,
    load_config,
    parse_overrides,
)

USER_ERRORS = (ConfigError,)

# Never uploaded: the local environment (the cluster has its own), run outputs, history.
EXCLUDES = (".venv", "runs", ".git")

# After the log stream ends, how long to wait for the job's final status to be recorded.
STATUS_WAIT_S = 30.0

# What the printed command shows in place of an environment variable's value.
HIDDEN = "<set>"
# `--set ray.runtime_env.env_vars.NAME=VALUE` on the command line: the value is hidden the same way.
ENV_VAR_OVERRIDE = re.compile(r"^(ray\.runtime_env\.env_vars\.[^=]+=).*", re.DOTALL)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="training config (YAML); must lie inside --working-dir")
    parser.add_argument("--address", required=True, metavar="URL",
                        help="the cluster's dashboard, e.g. http://HEAD:8265")
    parser.add_argument("--working-dir", default=".", metavar="DIR",
                        help="folder uploaded as the job's working directory (default: .); replaces any "
                             "working_dir in the config's ray.runtime_env")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    parser.add_argument("--resume", action="store_true", help="the job continues the run's latest checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in the job, as for `calm train`")
    parser.add_argument("--paths-on-cluster", action="store_true",
                        help="the models and data exist only on the cluster: check just the config and the "
                             "address here, not the model, tokenizer and data paths")


def build_job_request(
    config_path: str | Path, address: str, working_dir: str | Path, config: TrainConfig,
    train_args: Sequence[str] = (),
) -> dict:
    """Everything the submission needs: the client address, the `submit_job` arguments, and the
    equivalent `ray job submit` command line, for people: environment variables by name, their values
    shown as <set> (the runtime env and entrypoint the job gets keep them).

    The entrypoint names the config by its path inside the working directory, as the job sees it: the
    cluster resolves the config's relative paths against its own copy.
    """
    working = Path(working_dir).resolve()
    config_file = Path(config_path).resolve()
    if not working.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: no such folder")
    try:
        inside = config_file.relative_to(working).as_posix()
    except ValueError:
        raise ConfigError(
            f"{config_path}: the config lies outside --working-dir {working}, so the job could not read it "
            "there; move it inside or choose a working directory that contains it"
        ) from None
    runtime_env = copy.deepcopy(config.ray.runtime_env)
    runtime_env["working_dir"] = str(working)
    runtime_env["excludes"] = list(dict.fromkeys([*runtime_env.get("excludes", []), *EXCLUDES]))
    # The job's driver runs on a cluster node, where "auto" finds the cluster; whatever address the file
    # names is for runs started elsewhere (and without one, train would start a cluster of its own).
    entrypoint = ["python", "-m", "launcher.cli", "train", inside, "--set", "ray.address=auto", *train_args]
    shown_env = dict(runtime_env)  # for people: variables by name only
    if isinstance(shown_env.get("env_vars"), dict):
        shown_env["env_vars"] = dict.fromkeys(shown_env["env_vars"], HIDDEN)
    shown_entrypoint = [ENV_VAR_OVERRIDE.sub(rf"\g<1>{HIDDEN}", arg) for arg in entrypoint]
    command_line = shlex.join(["ray", "job", "submit", "--address", address,
                               "--runtime-env-json", json.dumps(shown_env, sort_keys=True), "--", *shown_entrypoint])
    return {
        "address": address,
        "entrypoint": shlex.join(entrypoint),
        "runtime_env": runtime_env,
        "metadata": {"calm_config": inside, "calm_name": config.name},
        "command_line": command_line,
    }


def run(args: argparse.Namespace) -> int:
    from launcher.preflight import check_reachable, describe, preflight

    # Checked against the address the job goes to; the file itself is uploaded unchanged.
    overrides = {**parse_overrides(args.set), "ray.address": args.address}
    given = {"ray.address": f"--address {args.address}"}
    config = load_config(args.config, overrides=overrides, given=given)
    with blamed_on_command_line(overrides, given):
        if args.paths_on_cluster:
            check_reachable(args.address)
        else:
            print(describe(preflight(config)))
    train_args = [arg for pair in args.set for arg in ("--set", pair)] + (["--resume"] if args.resume else [])
    request = build_job_request(args.config, args.address, args.working_dir, config, train_args)

    try:  # the Jobs API client needs Ray's full install (aiohttp and friends), not just ray[train]
        import aiohttp  # noqa: F401
    except ImportError:
        raise ConfigError("calm submit needs Ray's job client: pip install 'calm-dist[submit]' "
                          "(that is, ray[default])") from None
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    from launcher.runtime.ray_auth import find_token, refusal

    print(f"equivalent command: {request['command_line']}")
    if HIDDEN in request["command_line"]:
        print(f"(environment variables are shown as {HIDDEN}, not by value: the job gets their values; "
              "typing the command yourself, put them in)")
    token = find_token()
    try:
        client = JobSubmissionClient(request["address"], headers=token.headers() if token else None)
        job_id = client.submit_job(
            entrypoint=request["entrypoint"], runtime_env=request["runtime_env"], metadata=request["metadata"]
        )
    except ConnectionError as err:  # something listens there, but not a Ray dashboard
        raise ConfigError(f"ray.address: {args.address} does not answer as a Ray dashboard: {err}") from None
    except AuthenticationError as err:
        status = 403 if str(err).startswith("Authentication failed") else 401
        raise ConfigError(refusal(args.address, status, token)) from None
    print(f"submitted job {job_id}")
    if args.no_wait:
        print(f"follow it with: ray job logs --address {shlex.quote(args.address)} --follow {job_id}")
        return 0
    try:
        asyncio.run(_print_logs(client, job_id))
        status = _final_status(client, job_id)
    except KeyboardInterrupt:
        print(f"stopped following; job {job_id} keeps running. Stop it with: "
              f"ray job stop --address {shlex.quote(args.address)} {job_id}", file=sys.stderr)
        raise
    print(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


async def _print_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def _final_status(client, job_id: str):
    # The log stream closes when the job ends, but its status may be recorded a moment later.
    deadline = time.monotonic() + STATUS_WAIT_S
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    return status
