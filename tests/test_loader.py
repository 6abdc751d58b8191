"""load_model refuses bad folders with messages that name the problem and what is valid."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import build_model

from rsd_engine.models import SUPPORTED_ARCHITECTURES, load_model


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_tokenizer_dir):
    return build_model(tmp_path_factory.mktemp("src") / "m", "qwen3", tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture
def folder(source, tmp_path):
    return shutil.copytree(source, tmp_path / "m")


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_loads_and_reports_config(folder):
    model = load_model(folder, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.config.architecture == "Qwen3ForCausalLM"
    assert model.config.vocab_size == 512 and not any(p.requires_grad for p in model.parameters())


def test_a_null_context_reads_as_an_absent_one(folder):
    """max_position_embeddings: null was taken as the context itself: the engine's check of max_seq_len against it
    failed with a TypeError deep inside."""
    from rsd_engine.runtime import warn_past_context

    edit_config(folder, max_position_embeddings=None)
    model = load_model(folder)
    assert model.config.max_position_embeddings == 4096
    warn_past_context(64, student=model)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_a_file_given_for_the_folder_is_named(folder):
    with pytest.raises(NotADirectoryError, match=r"model.safetensors is a file, but a model is a folder .* "
                                                 r"pass the folder that holds it"):
        load_model(folder / "model.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_name_the_file_and_model(folder, damage):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match=rf"{path} \(model {folder}\) is not a readable safetensors file, maybe "
                                         r"truncated or corrupt .*Download or convert the weights again"):
        load_model(folder)


def test_corrupt_demo_cache_says_how_to_rebuild_it(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RSD_ENGINE_CACHE", str(tmp_path))  # `folder` sits in it, as the demo pair does
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"model.safetensors .*demo pair's cache: delete {folder} and run "
                                         r"`rsd demo` again.*demo_models.py"):
        load_model(folder)


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(folder)


def test_no_safetensors(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        load_model(folder)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.pth", "model.pt"])
def test_pickle_weights_are_refused(folder, name):
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(b"never unpickled")
    with pytest.raises(FileNotFoundError, match=rf"only pickle weights \({name}\).*refused.*safetensors"):
        load_model(folder)


def test_unsupported_architecture(folder):
    edit_config(folder, architectures=["MistralForCausalLM"])
    with pytest.raises(ValueError, match="MistralForCausalLM") as e:
        load_model(folder)
    assert all(arch in str(e.value) for arch in SUPPORTED_ARCHITECTURES)


def test_remote_code_is_never_run(folder):
    edit_config(folder, architectures=["MyReasonerForCausalLM"],
                auto_map={"AutoModelForCausalLM": "modeling_my.MyReasonerForCausalLM"})
    (folder / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match="MyReasonerForCausalLM.*remote code is never run"):
        load_model(folder)


def test_custom_code_of_a_built_in_architecture_is_never_run_and_named(folder):
    """A folder whose config names a built-in architecture and custom code (auto_map) loads with the built-in code;
    it did so silently: a model whose own code computes something else would have run as the stock one."""
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (folder / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.warns(UserWarning, match="auto_map .custom modelling code, never run here.: the model is loaded as "
                                         "the built-in") as warned:
        load_model(folder)
    # Named by its folder's file (of a teacher and a student, which one), as config.json's errors are.
    assert [str(w.message) for w in warned if "auto_map" in str(w.message)][0].startswith(f"{folder / 'config.json'} has")


def test_load_model_refuses_a_device_rsd_does_not_run_on(folder):
    """load_model(device=...) took any device torch names (mps, meta: a failure deep inside torch, or a model of
    meta tensors); it is refused as the Engine and the CLI refuse it."""
    for device in ("meta", "mps"):
        with pytest.raises(ValueError, match=f"device='{device}' is not supported: rsd runs on CPU or CUDA devices"):
            load_model(folder, device=device)


def test_missing_tensors_are_named(folder):
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"], state["model.norm.weight"]
    save_file(state, folder / "model.safetensors")
    # The folder is named: with a teacher and a student, the message said not which of them was broken.
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder))}: the checkpoint is missing 2 tensors: "
                                         "model.layers.1.mlp.up_proj.weight, model.norm.weight"):
        load_model(folder)


@pytest.mark.parametrize("layers", [3, 10**6])
def test_more_layers_than_the_checkpoint_holds_are_refused_before_any_is_built(folder, layers, monkeypatch):
    """num_hidden_layers = 10**6 (under the size fields' cap) built that many empty layers before the missing
    tensors were named: minutes and gigabytes (20,000 took 23 s and 1.1 GiB). The safetensors headers say how many
    layers the checkpoint holds; past that, the config is refused before anything is built."""
    from rsd_engine.models import loader

    def build(config):
        raise AssertionError(f"built {config.num_layers} layers")

    monkeypatch.setattr(loader, "_build", build)
    edit_config(folder, num_hidden_layers=layers)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder / 'config.json'))}: num_hidden_layers = {layers}, "
                                         rf"where at most 2 can load: the checkpoint holds the tensors of 2 layers"):
        load_model(folder)
    state = load_file(folder / "model.safetensors")  # no layer at all: what it holds is named
    save_file({k: v for k, v in state.items() if not k.startswith("model.layers.")}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"at most 0 can load: the checkpoint holds no layer's tensors "
                                         r"\(model.layers.N.\*; it holds "):
        load_model(folder)


def test_shape_mismatch_is_named(folder):
    edit_config(folder, intermediate_size=96)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}: tensor model.layers.0.mlp.down_proj.weight "
                                         r".* shape \(64, 128\).*\(64, 96\)"):
        load_model(folder)


def test_missing_shard_is_named(tmp_path, tiny_tokenizer_dir):
    folder = build_model(tmp_path / "m", "qwen3", tokenizer_dir=tiny_tokenizer_dir, shards=2)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(folder)


def _spoil_index(folder, spoil):
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    path.write_text(json.dumps(spoil(index)))
    return path


INDEX_DAMAGE = {
    "weight_map-list": lambda i: {**i, "weight_map": list(i["weight_map"].values())},
    "weight_map-null": lambda i: {**i, "weight_map": None},
    "weight_map-absent": lambda i: {"metadata": i["metadata"]},
    "file-null": lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": None}},
    "file-int": lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": 3}},
    "file-empty": lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": ""}},
}


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory, tiny_tokenizer_dir):
    return build_model(tmp_path_factory.mktemp("sharded") / "m", "qwen3", tokenizer_dir=tiny_tokenizer_dir, shards=2)


@pytest.mark.parametrize("damage", list(INDEX_DAMAGE))
def test_malformed_index_is_named(sharded_source, tmp_path, damage):
    """A weight_map that is not a map of tensor names to file names was an AttributeError or TypeError
    traceback from inside the loader."""
    folder = shutil.copytree(sharded_source, tmp_path / "m")
    index = _spoil_index(folder, INDEX_DAMAGE[damage])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(index))}: weight_map must map tensor names to file "
                                         r"names$"):
        load_model(folder)


def test_an_empty_index_or_one_not_an_object_is_named(sharded_source, tmp_path):
    folder = shutil.copytree(sharded_source, tmp_path / "m")
    _spoil_index(folder, lambda i: {**i, "weight_map": {}})
    with pytest.raises(ValueError, match=r"model.safetensors.index.json has an empty weight_map"):
        load_model(folder)
    _spoil_index(folder, lambda i: [1, 2])
    with pytest.raises(ValueError, match=r"model.safetensors.index.json holds a JSON list, not an object"):
        load_model(folder)


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_shard_outside_the_folder_is_refused(sharded_source, tmp_path, where):
    """An index naming ../outside.safetensors (or an absolute path) loaded that file's weights, silently."""
    folder = shutil.copytree(sharded_source, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    outside = shard.rename(tmp_path / "outside.safetensors")
    name = "../outside.safetensors" if where == "relative" else str(outside)
    index = _spoil_index(folder, lambda i: {**i, "weight_map": {
        tensor: name if file == shard.name else file for tensor, file in i["weight_map"].items()}})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(index))}: weight_map names {re.escape(repr(name))} "
                                         r"for .*weight, a file outside the model folder"):
        load_model(folder)


@pytest.mark.parametrize("name, shape", [("model.layers.0.self_attn.o_proj.bias", (64,)),
                                         ("model.layers.1.self_attn.q_proj.bias", (64,)),
                                         ("model.layers.0.mlp.down_proj.bias", (64,)),
                                         ("model.layers.2.input_layernorm.weight", (64,))])
def test_tensors_the_config_does_not_account_for_are_refused(folder, name, shape):
    """A bias without attention_bias / mlp_bias (as Qwen3's attention_bias was ignored), or a layer past
    num_hidden_layers, was skipped silently: the model loaded, its outputs not the checkpoint's."""
    path = folder / "model.safetensors"
    state = load_file(path)
    state[name] = torch.randn(shape)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"checkpoint has 1 tensor\(s\) that config.json does not account for: "
                                         rf"{re.escape(name)}; .*attention_bias, mlp_bias, num_hidden_layers"):
        load_model(folder)


def test_a_tensor_stored_twice_is_refused(folder):
    """Two copies of one tensor in two files (a stray shard beside the indexed ones): the last file read won,
    whichever the index named."""
    state = load_file(folder / "model.safetensors")
    name = "model.embed_tokens.weight"
    save_file({name: torch.zeros_like(state[name])}, folder / "stray.safetensors", metadata={"format": "pt"})
    (folder / "model.safetensors").rename(folder / "a.safetensors")  # no index: every *.safetensors is read
    with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} is stored twice, in a.safetensors and "
                                         rf"stray.safetensors"):
        load_model(folder)


def test_model_safetensors_is_read_over_other_files_beside_it(folder):
    """A folder holding model.safetensors and another full copy (Mistral's consolidated.safetensors): as in
    transformers, model.safetensors is the checkpoint and the other file is not read (not "stored twice")."""
    state = load_file(folder / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, folder / "consolidated.safetensors",
              metadata={"format": "pt"})
    model = load_model(folder)
    name = "model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[name], state[name].to(model.dtype))


def test_buffers_and_a_tied_head_copy_are_still_skipped(folder):
    """What a checkpoint may hold beside the weights: old rotary buffers, and lm_head.weight next to tied
    embeddings (the head is the embedding: nothing is lost)."""
    path = folder / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, path, metadata={"format": "pt"})
    edit_config(folder, tie_word_embeddings=True)
    model = load_model(folder)
    assert model.config.tie_word_embeddings and not hasattr(model, "lm_head")


def test_bad_dtype(folder):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        load_model(folder, dtype=torch.int8)


def test_eos_ids_include_generation_config(folder):
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [452, 450]}))
    assert load_model(folder).config.eos_token_ids == (452, 450)
    (folder / "generation_config.json").unlink()
    assert load_model(folder).config.eos_token_ids == (452,)


def _no_hidden_size(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))


CONFIG_DAMAGE = {
    "invalid-json": (lambda f: (f / "config.json").write_text("{bad"), r"config.json is not valid JSON"),
    "json-list": (lambda f: (f / "config.json").write_text("[1, 2]"),
                  r"config.json holds a JSON list, not an object"),
    "no-hidden-size": (_no_hidden_size, r"config.json has no 'hidden_size', which a \['Qwen3ForCausalLM'\] model "
                                        r"needs"),
    "unsupported-architecture": (lambda f: edit_config(f, model_type="mamba", architectures=["MambaForCausalLM"]),
                                 r"unsupported architecture: MambaForCausalLM"),
    "generation-config-list": (lambda f: (f / "generation_config.json").write_text("[1]"),
                               r"generation_config.json holds a JSON list, not an object"),
    # Sizes of the wrong type crashed deep in torch (empty() of None, range() of 2.0, a division by 0 heads).
    "vocab-size-null": (lambda f: edit_config(f, vocab_size=None),
                        r"config.json: vocab_size = None, where a positive integer is needed"),
    "layers-float": (lambda f: edit_config(f, num_hidden_layers=2.0),
                     r"config.json: num_hidden_layers = 2.0, where a positive integer is needed"),
    "no-heads": (lambda f: edit_config(f, num_attention_heads=0),
                 r"config.json: num_attention_heads = 0, where a positive integer is needed"),
    "eps-text": (lambda f: edit_config(f, rms_norm_eps="1e-6"),
                 r"config.json: rms_norm_eps = '1e-6', where a finite positive number is needed"),
    # Each of these names the folder's file. "no" was read as true (bool("no")) and the checkpoint's lm_head dropped
    # silently; the others reached transformers' strict config (a StrictDataclassFieldValidationError traceback).
    "tie-embeddings-text": (lambda f: edit_config(f, tie_word_embeddings="no"),
                            r"/m/config.json: tie_word_embeddings = 'no', where true or false is needed"),
    "attention-bias-text": (lambda f: edit_config(f, attention_bias="false"),
                            r"/m/config.json: attention_bias = 'false', where true or false is needed"),
    "pad-id-text": (lambda f: edit_config(f, pad_token_id="x"),
                    r"/m/config.json: pad_token_id = 'x', where an integer token id \(or null\) is needed"),
    "bos-id-float": (lambda f: edit_config(f, bos_token_id=1.5),
                     r"/m/config.json: bos_token_id = 1.5, where an integer token id \(or null\) is needed"),
    # int("x") failed naming neither the file nor the field.
    "eos-id-text": (lambda f: edit_config(f, eos_token_id="x"),
                    r"/m/config.json: eos_token_id = 'x', where a token id \(an integer >= 0\) or a list of them"),
    "generation-eos-text": (lambda f: (f / "generation_config.json").write_text('{"eos_token_id": "x"}'),
                            r"/m/generation_config.json: eos_token_id = 'x', where a token id \(an integer >= 0\)"),
    # factor 0 loaded and every generation failed on NaN logits; an infinite theta loaded.
    "rope-factor-zero": (lambda f: edit_config(f, rope_parameters={
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
                         r"/m/config.json: rope_parameters.factor = 0, where a number >= 1 is needed"),
    "rope-theta-infinite": (lambda f: edit_config(f, rope_parameters={"rope_type": "default",
                                                                      "rope_theta": float("inf")}),
                            r"/m/config.json: rope_parameters.rope_theta = inf, where a finite positive number"),
    "unsupported-architecture-named": (lambda f: edit_config(f, architectures=["MambaForCausalLM"]),
                                       r"/m/config.json: unsupported architecture: MambaForCausalLM"),
    # A supported architecture named after another model's model_type: transformers printed its config (40 lines)
    # and the error blamed the tokenizer.
    "model-type-of-another-architecture": (
        lambda f: edit_config(f, model_type="mamba", architectures=["MambaForCausalLM", "Qwen3ForCausalLM"]),
        r"/m/config.json: model_type = 'mamba' with architectures = \['MambaForCausalLM', 'Qwen3ForCausalLM'\]: "
        r"Qwen3ForCausalLM is model_type 'qwen3', .*Supported: LlamaForCausalLM \(model_type 'llama'\), "
        r"Qwen2ForCausalLM \(model_type 'qwen2'\), Qwen3ForCausalLM \(model_type 'qwen3'\)"),
    # Sizes past any real model's were a RuntimeError (or TypeError) from deep inside torch when it was built.
    "hidden-size-past-2**31": (lambda f: edit_config(f, hidden_size=2**31, head_dim=2**29),
                               r"/m/config.json: hidden_size = 2147483648, where a positive integer is needed "
                               r"\(at most 2\*\*31 - 1 = 2147483647\)"),
    "intermediate-size-2**62": (lambda f: edit_config(f, intermediate_size=2**62),
                                r"/m/config.json: intermediate_size = 4611686018427387904, where a positive integer"),
    "weight-past-2**61-elements": (lambda f: edit_config(f, hidden_size=2**30, intermediate_size=2**31 - 1),
                                   r"/m/config.json: 2 \* intermediate_size x hidden_size \(gate and up_proj\) = "
                                   r"4294967294 x 1073741824 = \d+ elements in one weight, where at most 2\*\*61"),
    # Was run with SiLU whatever hidden_act said.
    "hidden-act-gelu": (lambda f: edit_config(f, hidden_act="gelu"),
                        r"hidden_act 'gelu' is not supported; the MLP is SwiGLU, so hidden_act must be one of "
                        r"silu, swish"),
}


def eval_error(folder, tmp_path, capsys) -> str:
    """`rsd eval --model folder`'s error: exit status 2 and one line, no traceback."""
    from rsd_engine.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "What is 2+2?", "answer": "4"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "g.jsonl"),
              "--max-new-tokens", "2", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_damaged_config_is_a_one_line_error(folder, tmp_path, capsys, damage):
    """load_config, load_tokenizer and the CLI give a ValueError that names the problem (exit 2), never a
    KeyError / AttributeError traceback from deep inside the loader or transformers."""
    from rsd_engine.models.loader import load_config
    from rsd_engine.tokens import load_tokenizer

    spoil, message = CONFIG_DAMAGE[damage]
    spoil(folder)
    for load in (load_config, load_tokenizer, load_model):
        with pytest.raises(ValueError, match=message):
            load(folder)
    err = eval_error(folder, tmp_path, capsys)
    assert re.search(message, err)


def test_a_field_transformers_refuses_is_a_one_line_error(folder, tmp_path, capsys):
    """transformers reads config.json to pick the tokenizer and refuses a field of the wrong type with a
    StrictDataclassFieldValidationError, a plain Exception: it was a traceback and exit 1 from load_tokenizer. A
    ValueError naming the file and the field now (exit 2). rsd-engine does not read use_cache itself."""
    from rsd_engine.tokens import load_tokenizer

    edit_config(folder, use_cache="yes")
    message = (rf"^{re.escape(str(folder))}/config.json: Validation error for field 'use_cache': TypeError: Field "
               rf"'use_cache' expected bool, got str \(value: 'yes'\)")
    with pytest.raises(ValueError, match=message):
        load_tokenizer(folder)
    assert re.search(message[1:], eval_error(folder, tmp_path, capsys))


def test_unreadable_tokenizer_is_a_one_line_error(folder, tmp_path, capsys):
    from rsd_engine.tokens import load_tokenizer

    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"cannot load the tokenizer in {folder} \(KeyError: 'added_tokens'\)"):
        load_tokenizer(folder)
    assert "cannot load the tokenizer" in eval_error(folder, tmp_path, capsys)


def test_quantized_checkpoint_is_refused(folder):
    """quantization_config: the weights need scales that are never applied; refused, naming the method."""
    from rsd_engine.models.loader import load_config

    edit_config(folder, quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"})
    for load in (load_config, load_model):
        with pytest.raises(ValueError, match=r"a quantized checkpoint \(quantization_config: fp8\) is not supported"):
            load(folder)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_non_float_weights_are_refused(folder, dtype):
    """Even without quantization_config: a float8 or integer tensor is not cast as if it were the weight."""
    path = folder / "model.safetensors"
    state = load_file(path)
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = state[name].clamp(-1, 1).to(dtype)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} in model.safetensors is stored as "
                                         rf"{re.escape(str(dtype))}: quantized or integer weights are not supported"):
        load_model(folder)


def test_a_cuda_device_becomes_the_current_device(folder, monkeypatch):
    """Triton launches on the current CUDA device and CUDA graphs capture the current stream: a model loaded on
    cuda:1 while the current device was 0 ran its kernels on GPU 0 with GPU 1's pointers. Loading makes the
    model's device the current one, first of all (set_device stands in for the card here and stops the load)."""
    class Selected(Exception):
        pass

    def set_device(device):
        raise Selected(torch.device(device))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two cards, as far as the device check knows
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(Selected) as selected:
        load_model(folder, device="cuda:1")
    assert selected.value.args[0] == torch.device("cuda:1")
    load_model(folder, device="cpu")  # no CUDA device: nothing to select
