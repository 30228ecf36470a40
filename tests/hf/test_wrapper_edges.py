"""The wrapper's rough edges as a new user meets them: each case failed (or misled) before its fix."""

from __future__ import annotations

import copy
import gc
import math
import pickle
import subprocess
import sys
import threading
import weakref

import pytest
import torch

from offload import OffloadConfig, OffloadedModel
from tests.conftest import tiny_model

GREEDY = dict(do_sample=False, pad_token_id=0)


def _ids(n=40, seed=0, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_generate_without_a_length_argument_uses_transformers_default():
    model = tiny_model("llama-gqa")
    ids = _ids()
    with torch.no_grad(), pytest.warns(UserWarning):
        expected = model.generate(ids, **GREEDY)  # transformers' model-agnostic default length
    with OffloadedModel(model) as om, pytest.warns(UserWarning):
        assert torch.equal(om.generate(ids, **GREEDY), expected)


def test_inputs_and_inputs_embeds_are_accepted():
    model = tiny_model("llama-gqa")
    ids = _ids(batch=2)
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, **GREEDY)
        expected_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=4, **GREEDY)
        expected_logits = model(ids).logits
    with OffloadedModel(model, page_size=8) as om:
        assert torch.equal(om.generate(inputs=ids, max_new_tokens=4, **GREEDY), expected)
        assert torch.equal(om.generate(inputs_embeds=embeds, max_new_tokens=4, **GREEDY), expected_embeds)
        assert om.stats.tokens_generated == 8 and om.stats.prefix_hit_tokens == 0
        torch.testing.assert_close(om(inputs_embeds=embeds).logits, expected_logits, rtol=0, atol=1e-4)
        with pytest.raises(ValueError, match="input_ids or as inputs"):
            om.generate(ids, inputs=ids, max_new_tokens=1)


def test_two_wrappers_unwrapped_in_creation_order_restore_the_model():
    model = tiny_model("llama-gqa")
    before = model.config._attn_implementation
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    first, second = OffloadedModel(model), OffloadedModel(model)
    first.unwrap()
    torch.testing.assert_close(second(ids).logits, expected, rtol=0, atol=1e-4)  # the second still works
    second.unwrap()
    assert model.config._attn_implementation == before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


@pytest.mark.parametrize("call", ["generate", "forward"])
def test_use_cache_false_and_output_attentions_are_refused_clearly(call):
    with OffloadedModel(tiny_model("llama-gqa")) as om:
        run = (lambda **kw: om.generate(_ids(), max_new_tokens=2, **kw)) if call == "generate" else (lambda **kw: om(_ids(), **kw))
        with pytest.raises(ValueError, match="use_cache=False"):
            run(use_cache=False)
        with pytest.raises(ValueError, match="output_attentions"):
            run(output_attentions=True)


def test_one_wrapper_called_from_two_threads():
    model = tiny_model("qwen2")
    prompts = [_ids(60, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [model.generate(p, max_new_tokens=4, **GREEDY) for p in prompts]
    results, errors = {}, []
    with OffloadedModel(model, page_size=8) as om:
        def work(i):
            try:
                results[i] = om.generate(prompts[i], max_new_tokens=4, **GREEDY)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert all(torch.equal(results[i], expected[i]) for i in range(4))


def test_unwrap_frees_the_last_cache():
    model = tiny_model("llama-gqa")
    om = OffloadedModel(model)
    out = om(_ids(200))
    cache = weakref.ref(out.past_key_values)
    store = om.store
    del out
    om.unwrap()
    gc.collect()
    assert cache() is None  # nothing module-level keeps it (or its pools) alive
    assert all(pool.num_used == 0 for pool in store.homes)


@pytest.mark.parametrize("field", ["device_budget", "host_budget"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_budgets_name_the_setting(field, value):
    with pytest.raises(ValueError, match=field):
        OffloadConfig.from_env({}, **{field: value})


def test_copy_and_pickle_are_refused_clearly():
    with OffloadedModel(tiny_model("llama-gqa")) as om:
        for attempt in (lambda: copy.deepcopy(om), lambda: copy.copy(om), lambda: pickle.dumps(om)):
            with pytest.raises(TypeError, match="cannot be pickled or copied"):
                attempt()


def test_interpreter_exit_after_generate_is_clean():
    code = (
        "import torch\n"
        "from tests.conftest import tiny_model\n"
        "from offload import OffloadedModel\n"
        "om = OffloadedModel(tiny_model('llama-gqa'), page_size=8, emulate_link_gbps=5.0)\n"
        "ids = torch.randint(3, 100, (2, 300))\n"
        "out = om.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)\n"
        "print('done')\n"  # exits with the wrapper, its store and a cache still alive
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "done" in run.stdout and "terminate called" not in run.stderr


def test_demo_fits_the_prompt_to_a_model_with_few_positions(tmp_path, capsys):
    import transformers

    from offload.demo import main

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    main([str(tmp_path), "--new-tokens", "4", "--budget-fraction", "0.3"])  # default prompt: 4096 tokens
    out = capsys.readouterr().out
    assert "shortened to 252 tokens" in out and "identical tokens" in out


def test_prompt_lookup_verifying_past_the_requested_length_runs():
    model = tiny_model("llama-gqa")
    ids = torch.tensor([[98, 17, 127, 121, 16, 66, 119, 94, 12, 60, 126, 101, 115, 54]])
    kwargs = dict(max_new_tokens=4, prompt_lookup_num_tokens=3, **GREEDY)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
    for page_size in (1, 4, 16):
        with OffloadedModel(model, page_size=page_size, sink_tokens=page_size, recent_tokens=2 * page_size) as om:
            assert torch.equal(om.generate(ids, **kwargs), expected)


def test_sparse_mode_wraps_whatever_its_token_budget():
    """The wrap-time probe compares exact attention; the user's sparse settings must not fail it."""
    model = tiny_model("llama-mha")
    with OffloadedModel(model, page_size=4, mode="sparse", token_budget=7) as om:
        assert om.config.mode == "sparse"
        om.generate(_ids(), max_new_tokens=3, **GREEDY)


def test_assisted_decoding_refuses_to_continue_a_cache_up_front():
    with OffloadedModel(tiny_model("llama-gqa")) as om:
        first = om.generate(_ids(40), max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
        with pytest.raises(ValueError, match="without past_key_values"):
            om.generate(torch.cat([first.sequences, _ids(5, seed=2)], 1), past_key_values=first.past_key_values,
                        max_new_tokens=3, prompt_lookup_num_tokens=4, **GREEDY)
