"""Start-up with real SGLang (server tests): every stage that can reject a launch prints one line and exits 2;
``sglang.Engine`` callers get the :class:`~diffkv_sglang.integration.args.Refusal` (a ValueError) instead of an
exit; an ``--attention-backend`` the pool replaces is logged as overridden in one line; decode CUDA graphs stay as
SGLang configures them on CUDA unless something rules them out; the start-up calibration runs once per model and
is cached; ``--help`` lists the flags. All of it happens in SGLang's argument resolution, before SGLang loads the
model.

The command lines run in children of one interpreter that imported SGLang once (:mod:`diffkv_devtools.preloaded`:
the import is 11 of the 17 s each launch costs on 2 cores). ``test_bad_kernel_switch_fails_at_start_up`` runs in
a fresh process, the guard that a forked child behaves as a fresh launch does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from diffkv_devtools.preloaded import Job, run_preloaded
from diffkv_devtools.sglang_server import cpu_env
from diffkv_sglang.backend_select import MODES

pytestmark = pytest.mark.server

ERROR = "sglang serve: error: "
REFUSED = " with --kv-pool diffkv "
LAUNCHER = "sglang.launch_server"

# Every stage that can reject a launch (argparse, DiffKV config, SGLang resolution): the flags, the environment
# and the exact one-line message on stderr; every flag's message is also unit-tested in test_integration_args.py
# without starting processes.
BAD_LAUNCHES = {
    "unknown pool": (["--kv-pool", "compressed"], {},
                     "argument --kv-pool: invalid choice: 'compressed' (choose from 'default', 'diffkv')"),
    "negative alpha": (["--kv-pool", "diffkv", "--diffkv-alpha-low", "-1"], {},
                       "argument --diffkv-alpha-low: invalid value -1.0; allowed: a finite number >= 0 (0 disables "
                       "pruning)"),
    "bad tier": (["--kv-pool", "diffkv", "--diffkv-tiers", "k8v4,k5v3"], {},
                 "argument --diffkv-tiers: invalid value 'k5v3'; allowed: key bits one of (2, 4, 8) (got 5)"),
    "flag without pool": (["--diffkv-window", "8"], {}, "--diffkv-* flags need --kv-pool diffkv"),
    "kv cache dtype": (["--kv-pool", "diffkv", "--kv-cache-dtype", "fp8_e5m2"], {},
                       f"argument --kv-cache-dtype: invalid value 'fp8_e5m2'{REFUSED}(DiffKV chooses its own "
                       "precision); allowed: auto"),
    "page size": (["--kv-pool", "diffkv", "--page-size", "16"], {},
                  f"argument --page-size: invalid value 16{REFUSED}(the DiffKV page size is 32); allowed: 32 or "
                  "unset (change it with --diffkv-page-size)"),
    "decode backend": (["--kv-pool", "diffkv", "--decode-attention-backend", "torch_native"], {},
                       f"argument --decode-attention-backend: invalid value 'torch_native'{REFUSED}(only the diffkv "
                       "attention backend reads the DiffKV pool); allowed: diffkv or unset"),
    "hierarchical cache": (["--kv-pool", "diffkv", "--enable-hierarchical-cache"], {},
                           f"argument --enable-hierarchical-cache: invalid value True{REFUSED}(KV offloading is not "
                           "supported); allowed: off (flag not given)"),
    "calibration": (["--kv-pool", "diffkv", "--diffkv-calibration", "{model}/config.json"], {},
                    "argument --diffkv-calibration: invalid value '{model}/config.json'; allowed: off, auto, or a "
                    "directory for the calibration cache (an existing one, or a path containing '/')"),
    "cuda graph switch": (["--kv-pool", "diffkv"], {"DIFFKV_CUDA_GRAPH": "yes"},
                          f"environment variable DIFFKV_CUDA_GRAPH: invalid value 'yes'{REFUSED}(it switches "
                          "SGLang's decode CUDA graphs); allowed: 0 (off) or 1 (on, the default)"),
}

RESOLVE_GRAPHS = """
import sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.arg_groups.overrides import resolution_result
from sglang.srt.server_args import prepare_server_args
args = prepare_server_args(sys.argv[1:])
args.resolve_once()
graphs = resolution_result(args, "cuda_graph_config")
print("GRAPHS", graphs.decode.backend, graphs.prefill.backend)
"""

# (environment, device, SGLang's resolved decode graphs, why they are off)
GRAPH_CASES = {
    "default": ({}, "cuda", "full", ""),                       # SGLang's own decode setting stays
    "switch on": ({"DIFFKV_CUDA_GRAPH": "1"}, "cuda", "full", ""),
    "switch off": ({"DIFFKV_CUDA_GRAPH": "0"}, "cuda", "disabled", "DIFFKV_CUDA_GRAPH=0"),
    "cpu device": ({}, "cpu", "disabled", "device cpu"),       # never on a CPU device
    "torch kernels": ({"DIFFKV_KERNELS": "torch"}, "cuda", "disabled", "DIFFKV_KERNELS=torch"),   # graphs need
    "head_dim 48": ({}, "cuda", "disabled", "head_dim 48 is not a power of two"),        # the kernels, which
}                                                                                        # need a power of two

ENGINE = textwrap.dedent("""
    import sys
    import sglang
    from diffkv_sglang.integration.args import Refusal
    if __name__ == "__main__":
        try:
            sglang.Engine(model_path=sys.argv[1], kv_pool="diffkv", device="cpu", kv_cache_dtype="fp8_e5m2",
                          log_level="error")
        except Refusal as refusal:
            print("REFUSED", isinstance(refusal, ValueError), refusal)
""")

RESOLVE_BACKEND = textwrap.dedent("""
    import sys
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.server_args import prepare_server_args
    args = prepare_server_args(sys.argv[1:])
    args.resolve_once()
    print("BACKEND", resolving_view(args).attention_backend)
""")

RESOLVE_CONFIG = textwrap.dedent("""
    import sys
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.server_args import prepare_server_args
    from diffkv_sglang.integration.args import published_config
    args = prepare_server_args(sys.argv[1:])
    args.resolve_once()
    print("LAYER_TIERS", {layer: [t.name for t in tiers] for layer, tiers in published_config().layer_tiers.items()})
""")

SWITCHES = ("DIFFKV_CUDA_GRAPH", "DIFFKV_KERNELS")


@pytest.fixture(scope="module")
def launches(tiny_model, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every command line of this module but the fresh-process guard, run once; keyed by case name."""
    head_dim_48 = tmp_path_factory.mktemp("head-dim-48") / "model"          # the tiny model with head_dim 48
    shutil.copytree(tiny_model, head_dim_48)
    config = json.loads((head_dim_48 / "config.json").read_text())
    (head_dim_48 / "config.json").write_text(json.dumps({**config, "head_dim": 48}))

    jobs = {f"bad {name}": Job(["--model-path", str(tiny_model), "--device", "cpu", "--port", "1",
                                *(arg.format(model=tiny_model) for arg in args)], module=LAUNCHER, env=env)
            for name, (args, env, _) in BAD_LAUNCHES.items()}
    for name, (env, device, _, _) in GRAPH_CASES.items():
        model = head_dim_48 if name == "head_dim 48" else tiny_model
        unset = {switch: None for switch in SWITCHES if switch not in env}
        jobs[f"graphs {name}"] = Job(["--model-path", str(model), "--device", device, "--kv-pool", "diffkv",
                                      "--diffkv-calibration", "off"], code=RESOLVE_GRAPHS, env={**unset, **env})
    calibrate = ["--model-path", str(tiny_model), "--device", "cpu", "--kv-pool", "diffkv",
                 "--diffkv-calibration", str(tmp_path_factory.mktemp("calibration-cache"))]
    for start in ("first", "second"):                    # the second start finds the first one's result
        jobs[f"calibration {start}"] = Job(calibrate, code=RESOLVE_CONFIG)
    jobs["calibration with tiers"] = Job([*calibrate[:-2], "--diffkv-tiers", "k8v4,k4v2"], code=RESOLVE_CONFIG)
    jobs["help"] = Job(["--help"], module=LAUNCHER)
    jobs["engine"] = Job([str(tiny_model)], code=ENGINE)
    jobs["overridden backend"] = Job(["--model-path", str(tiny_model), "--device", "cpu", "--kv-pool", "diffkv",
                                      "--attention-backend", "torch_native"], code=RESOLVE_BACKEND)
    preload = (LAUNCHER, "sglang.srt.entrypoints.engine", "diffkv_sglang.plugin")
    return dict(zip(jobs, run_preloaded(list(jobs.values()), preload=preload)))


def refusal_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines of a failed launch, after checking that the launch failed as one line: exit code 2,
    no traceback, and after that line only SGLang's own log records (``[time] ...``, its process-tree clean-up).
    Other lines before it are SGLang's start-up warnings (the launcher's deprecation notice among them)."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if ": error: " in line]
    assert errors and all(line.startswith("[") for line in lines[errors[-1] + 1:]), done.stderr[-3000:]
    return [lines[i] for i in errors]


@pytest.mark.parametrize("name", BAD_LAUNCHES)
def test_bad_launches_fail_at_start_up(launches, tiny_model, name):
    assert refusal_lines(launches[f"bad {name}"]) == [ERROR + BAD_LAUNCHES[name][2].format(model=tiny_model)]


def test_start_up_calibration_is_measured_once_and_cached(launches):
    """No precision flags: resolution calibrates the model in a subprocess and publishes its per-layer tiers for
    the schedulers; the next start reads the cache. Tiers given on the command line are served as given."""
    first, second, given = (launches[f"calibration {start}"] for start in ("first", "second", "with tiers"))
    for done in (first, second, given):
        assert done.returncode == 0, done.stderr[-3000:]
    assert "DiffKV calibration: measuring" in first.stderr and "DiffKV calibration (measured in" in first.stderr
    assert "DiffKV calibration (from the cache" in second.stderr and "measuring" not in second.stderr
    chosen = first.stdout.strip().splitlines()[-1]
    assert chosen.startswith("LAYER_TIERS ") and second.stdout.strip().splitlines()[-1] == chosen
    assert "DiffKV calibration" not in given.stderr
    assert given.stdout.strip().splitlines()[-1] == "LAYER_TIERS {}"


def test_bad_kernel_switch_fails_at_start_up(tiny_model):
    """In a fresh process (the guard of the preloaded runs): ``DIFFKV_KERNELS`` is read at resolution."""
    done = subprocess.run([sys.executable, "-m", LAUNCHER, "--model-path", str(tiny_model), "--device", "cpu",
                           "--kv-pool", "diffkv", "--port", "1"], env=cpu_env({"DIFFKV_KERNELS": "fast"}),
                          capture_output=True, text=True, timeout=300)
    assert refusal_lines(done) == [f"{ERROR}environment variable DIFFKV_KERNELS: invalid value 'fast'{REFUSED}(it "
                                   "picks the DiffKV kernels); allowed: " + " or ".join(MODES)]


@pytest.mark.parametrize("name", GRAPH_CASES)
def test_decode_cuda_graphs_are_on_by_default_on_cuda(launches, name):
    """SGLang's own resolution (resolution needs no GPU, and reads only the model's config) keeps prefill graphs
    off, and decode graphs as SGLang configures them on a CUDA device unless DIFFKV_CUDA_GRAPH=0 or the store
    would run the torch reference (whose steps cannot be captured)."""
    _, _, decode, why = GRAPH_CASES[name]
    done = launches[f"graphs {name}"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"GRAPHS {decode} disabled" in done.stdout
    assert "decode CUDA graphs are " + ("as SGLang configures them" if decode == "full" else f"off ({why}") \
        in done.stderr


def test_help_lists_the_flags(launches):
    done = launches["help"]
    assert done.returncode == 0, done.stderr[-3000:]
    for flag in ("--kv-pool {default,diffkv}", "--diffkv-config", "--diffkv-tiers", "--diffkv-alpha-high",
                 "--diffkv-alpha-low", "--diffkv-window", "--diffkv-page-size", "--diffkv-arena-fraction",
                 "--diffkv-calibration"):
        assert flag in done.stdout, flag


def test_engine_users_get_the_exception(launches):
    done = launches["engine"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (
        "REFUSED True argument --kv-cache-dtype: invalid value 'fp8_e5m2' with --kv-pool diffkv (DiffKV chooses its "
        "own precision); allowed: auto")


def test_an_overridden_attention_backend_is_logged_in_one_line(launches):
    done = launches["overridden backend"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "BACKEND diffkv"
    lines = [line for line in done.stderr.splitlines() if "--attention-backend" in line]
    assert len(lines) == 1 and lines[0].endswith(
        "--kv-pool diffkv: --attention-backend torch_native is overridden: the attention backend is 'diffkv', the "
        "only one that reads the DiffKV pool"), done.stderr[-3000:]
