"""The SGLang contact surface (``diffkv_sglang.integration.upstream``): the table of every SGLang 0.5.23 internal the
plugin touches, and the checks that fail loudly.

In this process (fast, SGLang never imported): the table's shape, that the plugin's modules import SGLang only
through ``upstream``, and our checks on small stand-in objects: a missing attribute is an error naming both
versions, the model and layer checks report what the DiffKV pool cannot serve.

One ``slow`` subprocess (about 30 s: it imports SGLang, with the CPU shims on its ``PYTHONPATH``) checks the table
against the installed SGLang 0.5.23: every symbol and member resolves, every instance attribute is declared by its
class, the plugin's hooks fit their targets' signatures, the public frees of the paged allocator all reach the
``_release_page_ids`` the DiffKV allocator overrides, real ``RadixAttention`` layers and ``ModelConfig`` objects get
the expected verdicts, and ``register()`` wraps ``Engine.server_args_class``.
"""

from __future__ import annotations

import ast
import enum
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffkv_devtools.sglang_server import cpu_env
from diffkv_sglang import plugin
from diffkv_sglang.integration import upstream
from diffkv_sglang.integration.upstream import Internal, UpstreamMismatch

ROOT = Path(__file__).resolve().parents[1]
# every module of the plugin but integration/backend.py (its internals are listed; it imports them itself for now)
THROUGH_UPSTREAM = ("plugin.py", "integration/args.py", "integration/allocator.py", "integration/pool.py",
                    "integration/metrics.py", "integration/requests.py")


def version_message(what: str) -> str:
    return (f"diffkv-sglang supports SGLang {upstream.SUPPORTED_SGLANG}; {what} "
            f"(SGLang {upstream.installed_sglang_version()})")


# ------------------------------------------------------------------------------------------ the table
def test_the_table_is_well_formed():
    names = [row.qualname for row in upstream.INTERNALS]
    assert len(names) == len(set(names))
    for row in upstream.INTERNALS:
        assert row.module.startswith("sglang.") and row.qualname, row
        assert row.used_by and row.why and row.public, row
        assert f"``{row.path}``" in upstream.__doc__                  # rendered into the docstring


def test_every_hook_of_the_plugin_is_listed():
    assert {target for target, _ in plugin.HOOKS} == {row.dotted for row in upstream.INTERNALS if row.hook}


def test_the_plugin_imports_sglang_only_through_upstream():
    for relative in THROUGH_UPSTREAM:
        tree = ast.parse((ROOT / "diffkv_sglang" / relative).read_text())
        modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0]
        modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [m for m in modules if m.split(".")[0] == "sglang"], relative


def test_importing_the_plugin_imports_no_sglang(tmp_path):
    """SGLang objects are imported on first use only (the plugin module loads in every SGLang process)."""
    probe = ("import sys, diffkv_sglang.plugin, diffkv_sglang.integration.upstream as u; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sglang'), len(u.INTERNALS))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "[]"


# ------------------------------------------------------------------------------------ loud failures
def test_a_missing_module_attribute_or_member_is_a_mismatch_naming_the_version():
    with pytest.raises(UpstreamMismatch) as info:
        Internal("sglang_gone.srt.pools:Pool", "pool", "why", upstream.READ_ONLY).resolve()
    assert str(info.value) == version_message("module sglang_gone.srt.pools does not exist")
    with pytest.raises(UpstreamMismatch, match=r"json has no attribute 'Encoder' \(needed: json:Encoder\)"):
        Internal("json:Encoder", "plugin", "why", upstream.READ_ONLY).resolve()
    with pytest.raises(UpstreamMismatch) as info:
        Internal("json:JSONDecoder", "plugin", "why", upstream.READ_ONLY, members=("decode", "gone", "lost")).resolve()
    assert str(info.value) == version_message("JSONDecoder has no attribute 'gone' (nor 'lost')")
    assert isinstance(info.value, RuntimeError)


def test_a_broken_dependency_is_not_reported_as_a_version_mismatch(tmp_path, monkeypatch):
    (tmp_path / "needs_a_dependency.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        Internal("needs_a_dependency:Thing", "plugin", "why", upstream.READ_ONLY).resolve()


def test_a_missing_hook_target_fails_before_anything_is_registered(monkeypatch):
    gone = Internal("json:gone_function", "plugin", "why", "none", hook=True)
    monkeypatch.setattr(upstream, "INTERNALS", (gone,))
    with pytest.raises(UpstreamMismatch, match="json has no attribute 'gone_function'"):
        upstream.register_around_hooks([("json.gone_function", print)])
    with pytest.raises(ValueError, match="hook target json.dumps is not listed"):
        upstream.register_around_hooks([("json.dumps", print)])


class AttentionArch(enum.Enum):
    MHA = 1
    MLA = 2


class AttentionType(enum.Enum):
    DECODER = "decoder"
    ENCODER_ONLY = "encoder_only"


def model_config(**overrides):
    """A stand-in for SGLang's ModelConfig: a Llama-like dense model."""
    fields = dict(attention_arch=AttentionArch.MHA, is_hybrid_swa=False, is_encoder_decoder=False, head_dim=64,
                  context_len=2048, vocab_size=512)
    return SimpleNamespace(**{**fields, **overrides})


def layer(**overrides):
    """A stand-in for SGLang's RadixAttention: causal self-attention, head_dim 64."""
    fields = dict(layer_id=3, is_cross_attention=False, sliding_window_size=-1, logit_cap=0.0,
                  attn_type=AttentionType.DECODER, qk_head_dim=64, v_head_dim=64, tp_q_head_num=4, scaling=0.125)
    return SimpleNamespace(**{**fields, **overrides})


def without(namespace: SimpleNamespace, name: str) -> SimpleNamespace:
    return SimpleNamespace(**{k: v for k, v in vars(namespace).items() if k != name})


@pytest.fixture
def hybrid_ids(monkeypatch):
    """SGLang's hybrid classifier (``mambaish_config``) replaced: the stand-ins have no Hugging Face config."""
    hybrid = set()
    # set in the module's namespace: monkeypatch.setattr would first read upstream.mambaish_config (importing SGLang)
    monkeypatch.setitem(vars(upstream), "mambaish_config", lambda config: "mamba" if id(config) in hybrid else None)
    return hybrid


def test_a_model_config_without_attention_arch_is_an_error_not_a_default(hybrid_ids):
    with pytest.raises(UpstreamMismatch) as info:
        upstream.unsupported_model_features(without(model_config(), "attention_arch"))
    assert str(info.value) == version_message("ModelConfig has no attribute 'attention_arch'")
    with pytest.raises(UpstreamMismatch, match="ModelConfig has no attribute 'is_hybrid_swa' \\(nor 'vocab_size'\\)"):
        upstream.unsupported_model_features(without(without(model_config(), "is_hybrid_swa"), "vocab_size"))


def test_model_features(hybrid_ids):
    assert upstream.unsupported_model_features(model_config()) == []
    assert upstream.unsupported_model_features(model_config(attention_arch=AttentionArch.MLA)) == ["MLA attention"]
    assert upstream.unsupported_model_features(model_config(is_hybrid_swa=True, is_encoder_decoder=True)) == [
        "hybrid sliding-window attention", "an encoder-decoder architecture"]
    hybrid = model_config()
    hybrid_ids.add(id(hybrid))
    assert upstream.unsupported_model_features(hybrid) == ["Mamba / linear attention layers"]


def test_a_layer_without_sliding_window_size_is_an_error_not_a_default():
    with pytest.raises(UpstreamMismatch) as info:
        upstream.unsupported_layer_features(without(layer(), "sliding_window_size"))
    assert str(info.value) == version_message("RadixAttention has no attribute 'sliding_window_size'")


@pytest.mark.parametrize("overrides, features", [
    ({}, []),
    ({"sliding_window_size": None}, []),
    ({"logit_cap": None}, []),
    ({"is_cross_attention": True}, ["cross attention"]),
    ({"sliding_window_size": 4096}, ["sliding window 4096"]),
    ({"sliding_window_size": 0}, []),                              # no window, as RadixAttention reads it
    ({"logit_cap": 30.0}, ["logit soft-capping 30.0"]),
    ({"qk_head_dim": 192, "v_head_dim": 128}, ["qk_head_dim 192 != v_head_dim 128"]),
    ({"attn_type": AttentionType.ENCODER_ONLY}, ["attention type ENCODER_ONLY (not causal)"]),
    ({"is_cross_attention": True, "logit_cap": 50.0}, ["cross attention", "logit soft-capping 50.0"]),
])
def test_layer_features(overrides, features):
    assert upstream.unsupported_layer_features(layer(**overrides)) == features


# -------------------------------------------------------------------- against the installed SGLang 0.5.23
INSTALLED = r'''
import inspect, json, os, pkgutil, re, sys, tempfile

import torch

from diffkv_sglang import plugin
from diffkv_sglang.integration import upstream

result = {"missing": upstream.missing_internals(), "kv_pool_choices": upstream.is_available("add_kv_pool_choices")}


def declared(cls):
    """Attribute names a class declares: class members, annotations, struct fields, ``self.x =`` in its source."""
    names = set()
    for klass in cls.__mro__[:-1]:
        names |= set(vars(klass)) | set(vars(klass).get("__annotations__", {}))
        struct_fields = vars(klass).get("__struct_fields__", ())
        names |= set(struct_fields) if isinstance(struct_fields, tuple) else set()
        try:
            names |= set(re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?=(?!=)", inspect.getsource(klass)))
        except (OSError, TypeError):
            pass
    return names


fielded = [row for row in upstream.INTERNALS if row.fields and not row.optional]
result["undeclared"] = {row.qualname: sorted(set(row.fields) - declared(row.resolve())) for row in fielded}
result["control"] = sorted({"no_such_attribute"} - declared(upstream.RadixAttention))


def positional(parameters):
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


signature_problems = []
for target, hook in plugin.HOOKS:
    wanted = list(inspect.signature(pkgutil.resolve_name(target)).parameters.values())
    given = list(inspect.signature(hook).parameters.values())[1:]                   # after ``original``
    if positional(wanted) != positional(given):
        signature_problems.append(f"{target}: {positional(wanted)} positional parameters, hook {positional(given)}")
    takes_any_keyword = any(p.kind == p.VAR_KEYWORD for p in given)
    for p in wanted:
        if p.kind == p.KEYWORD_ONLY and p.default is p.empty and not takes_any_keyword:
            if p.name not in {q.name for q in given}:
                signature_problems.append(f"{target}: the hook does not take keyword {p.name}")
    for p in given:
        if p.kind == p.KEYWORD_ONLY and p.name not in {q.name for q in wanted}:
            signature_problems.append(f"{target}: no keyword {p.name}")
result["signatures"] = signature_problems


class Recorder(upstream.PagedTokenToKVPoolAllocator):
    """SGLang's paged allocator recording what reaches ``_release_page_ids``."""

    def _release_page_ids(self, *page_ids):
        self.released.append(sorted(torch.cat(page_ids).tolist()))
        super()._release_page_ids(*page_ids)


allocator = Recorder(64, 4, torch.float32, "cpu", None, need_sort=False)
allocator.released = []
pages = lambda slots: sorted((slots[::4] // 4).tolist())
first = allocator.alloc(8)
allocator.free(first)
second = allocator.alloc(8)
allocator.free_page_ids(second[::4] // 4)
third = allocator.alloc(8)
allocator.free_group_begin()
allocator.free(third[:4])
allocator.free_page_ids(third[4:5] // 4)
in_group = len(allocator.released)
allocator.free_group_end()
result["releases"] = {"free": [allocator.released[0], pages(first)],
                      "free_page_ids": [allocator.released[1], pages(second)],
                      "free_group_end": [sorted(sum(allocator.released[2:], [])), pages(third)],
                      "in_group": in_group}

from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

def radix(**kwargs):
    head_dim = kwargs.pop("head_dim", 16)
    return RadixAttention(num_heads=4, head_dim=head_dim, scaling=0.25, num_kv_heads=2, layer_id=0, **kwargs)

result["layers"] = {name: upstream.unsupported_layer_features(radix(**kwargs)) for name, kwargs in {
    "plain": {}, "sliding": {"sliding_window_size": 128}, "capped": {"logit_cap": 30.0},
    "cross": {"is_cross_attention": True}, "mla": {"head_dim": 192, "v_head_dim": 128},
    "encoder": {"attn_type": AttentionType.ENCODER_ONLY}}.items()}

from sglang.srt.configs.model_config import ModelConfig

CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
              "vocab_size": 256, "max_position_embeddings": 512},
    "mamba": {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2,
              "vocab_size": 256, "state_size": 8},
    "deepseek_v2": {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 64,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
                    "intermediate_size": 128, "vocab_size": 256, "kv_lora_rank": 16, "q_lora_rank": None,
                    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_position_embeddings": 512},
}
result["models"] = {}
for name, config in CONFIGS.items():
    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f)
    result["models"][name] = upstream.unsupported_model_features(ModelConfig(model_path=model_dir))

from diffkv_sglang.integration.backend import DiffKVAttnBackend

modes = [upstream.ForwardMode.DECODE, upstream.ForwardMode.EXTEND]
result["shared_read_ends"] = {
    "diffkv": {mode.name: DiffKVAttnBackend.shared_read_ends(None, mode).name for mode in modes},
    "sglang_default": {mode.name: upstream.AttentionBackend.shared_read_ends(None, mode).name for mode in modes}}

plugin.register()
from sglang.srt.entrypoints.engine import Engine

record = Engine.server_args_class(model_path="tiny", kv_pool="diffkv", diffkv_window=8)
result["engine"] = [type(record).__name__, record.model_path, os.environ["SGLANG_DIFFKV_POOL"],
                    json.loads(os.environ["SGLANG_DIFFKV_CONFIG"])["window"]]
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """What the subprocess found in the installed SGLang (a dict, see ``INSTALLED``)."""
    done = subprocess.run([sys.executable, "-c", INSTALLED], cwd=tmp_path_factory.mktemp("upstream"), env=cpu_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_listed_symbol_and_member_resolves(installed):
    assert installed["missing"] == []
    assert installed["kv_pool_choices"] is False                 # only with patches/sglang-0.5.23-kv-pool.patch


@pytest.mark.slow
def test_every_listed_instance_attribute_is_declared(installed):
    assert installed["control"] == ["no_such_attribute"]          # the scan does not find everything
    assert {name: missing for name, missing in installed["undeclared"].items() if missing} == {}
    assert set(installed["undeclared"]) == {row.qualname for row in upstream.INTERNALS if row.fields}


@pytest.mark.slow
def test_the_hooks_fit_their_targets(installed):
    assert installed["signatures"] == []


@pytest.mark.slow
def test_every_public_free_reaches_release_page_ids(installed):
    releases = installed["releases"]
    for path in ("free", "free_page_ids", "free_group_end"):
        released, allocated = releases[path]
        assert released == allocated and allocated, path
    assert releases["in_group"] == 2                              # a free group defers until free_group_end


@pytest.mark.slow
def test_real_layers_and_models(installed):
    assert installed["layers"] == {"plain": [], "sliding": ["sliding window 128"],
                                   "capped": ["logit soft-capping 30.0"], "cross": ["cross attention"],
                                   "mla": ["qk_head_dim 192 != v_head_dim 128"],
                                   "encoder": ["attention type ENCODER_ONLY (not causal)"]}
    assert installed["models"] == {"llama": [], "mamba": ["SSM attention", "Mamba / linear attention layers"],
                                   "deepseek_v2": ["MLA attention"]}


@pytest.mark.slow
def test_the_overlap_schedulers_barrier_waits_for_the_whole_forward(installed):
    """The scheduler releases and stages pages (store writes) while a forward runs; the backend reads the store in
    every layer, so its reads end after the forward in every mode. SGLang's default ends decode reads with the
    replayed graph's metadata preparation, which let a retraction free blocks a decode graph still read."""
    assert installed["shared_read_ends"] == {"diffkv": {"DECODE": "POST_REPLAY", "EXTEND": "POST_REPLAY"},
                                             "sglang_default": {"DECODE": "IN_REPLAY", "EXTEND": "UNKNOWN"}}


@pytest.mark.slow
def test_engine_keywords_reach_the_wrapped_server_args_class(installed):
    assert installed["engine"] == ["ServerArgs", "tiny", "diffkv", 8]
