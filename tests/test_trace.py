"""Tests of Trace and TraceDict against outputs computed by hand on the model zoo."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import nethook
from nethook.layers import LayerNotFoundError, resolve_layers
from nethook.trace import EditError, StopForward, Trace, TraceDict
from tests import zoo


def resnet_trunk(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of ResNet's stages computed by calling the stages one by one."""
    out = {}
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        h = getattr(model, name)(h)
        out[name] = h
    return out


@pytest.fixture(scope="module")
def resnet():
    return zoo.resnet18()


def test_exports():
    assert nethook.Trace is Trace and nethook.TraceDict is TraceDict
    assert nethook.StopForward is StopForward
    assert callable(nethook.load_model) and hasattr(nethook.interventions, "Ablate")


def test_trace_retains_the_stage_output(resnet):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = resnet_trunk(resnet, x)
        with Trace(resnet, "layer4") as t:
            resnet(x)
    torch.testing.assert_close(t.output, expected["layer4"], rtol=0, atol=0)
    assert len(t.outputs) == 1
    assert zoo.hook_counts(resnet) == 0


def test_module_given_directly(resnet):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with Trace(resnet.layer2, retain_input=True) as t:
            resnet(x)
        expected = resnet_trunk(resnet, x)
    torch.testing.assert_close(t.output, expected["layer2"], rtol=0, atol=0)
    torch.testing.assert_close(t.input, expected["layer1"], rtol=0, atol=0)
    assert t.layer is None


def test_traces_do_not_change_the_result(resnet):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        bare = resnet(x)
        with TraceDict(resnet, ["*"], clone=True, retain_input=True):
            traced = resnet(x)
    torch.testing.assert_close(traced, bare, rtol=0, atol=0)


def test_glob_expands_in_module_order(resnet):
    found = resolve_layers(resnet, ["layer*.conv2"])
    assert list(found) == [f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)]
    model = zoo.TinyTransformer()
    assert list(resolve_layers(model, "blocks.*.mlp")) == ["blocks.0.mlp", "blocks.1.mlp"]


def test_glob_and_duplicates_in_tracedict(resnet):
    with TraceDict(resnet, ["layer2", "layer?", "layer2"]) as td:
        pass
    assert list(td) == ["layer2", "layer1", "layer3", "layer4"]


def test_unknown_layer_fails_before_hooks_with_suggestions(resnet):
    with pytest.raises(LayerNotFoundError) as info:
        TraceDict(resnet, ["layer1", "layer4.1.conv"])
    message = str(info.value)
    assert "'layer4.1.conv'" in message and "layer4.1.conv1" in message
    assert zoo.hook_counts(resnet) == 0
    with pytest.raises(LayerNotFoundError, match="pattern 'block\\*'"):
        Trace(resnet, "block*")
    with pytest.raises(LayerNotFoundError, match="matches 8 modules"):
        Trace(resnet, "layer*.conv2")


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="got str"):
        Trace("resnet18", "layer4")
    with pytest.raises(TypeError, match="got dict"):
        TraceDict({}, ["layer4"])


def test_nested_module_list_and_dict_paths():
    model = zoo.Nested()
    x = torch.randn(3, 4)
    with TraceDict(model, ["stages.1.gate", "stages.0.proj"]) as td:
        model(x)
    stage0 = model.stages[0]
    h = stage0["proj"](x) * torch.sigmoid(stage0["gate"](x))
    torch.testing.assert_close(td["stages.0.proj"].output, stage0["proj"](x))
    torch.testing.assert_close(td["stages.1.gate"].output, model.stages[1]["gate"](h))


def test_module_called_three_times_keeps_every_call():
    model = zoo.SharedThrice()
    x = torch.randn(2, 4)
    with torch.no_grad():
        with Trace(model, "step", retain_input=True) as t:
            model(x)
        h1 = model.step(x)
        h2 = model.step(h1)
        h3 = model.step(h2)
    assert t.calls == 3
    for got, want in zip(t.outputs, [h1, h2, h3], strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(t.inputs, [x, h1, h2], strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(t.output, h3)


def test_each_forward_pass_starts_fresh():
    model = zoo.SharedThrice()
    x = torch.randn(5, 4)
    with torch.no_grad(), Trace(model, "step") as t:
        model(torch.randn(2, 4))
        model(x)
    assert len(t.outputs) == 3 and t.outputs[0].shape == (5, 4)
    torch.testing.assert_close(t.outputs[0], model.step(x))


def test_edit_targets_one_call_index():
    model = zoo.SharedThrice()
    x = torch.randn(2, 4)
    with torch.no_grad(), Trace(model, "step", edit_output=lambda out: out * 0, edit_calls=1) as t:
        y = model(x)
        expected = model.head(model.step(torch.zeros(2, 4)))
    torch.testing.assert_close(y, expected)
    assert torch.count_nonzero(t.outputs[1]) == 0
    assert torch.count_nonzero(t.outputs[0]) > 0
    with pytest.raises(ValueError, match="edit_calls"):
        Trace(model, "step", edit_calls=-1)


def test_keyword_inputs_are_retained():
    model = zoo.KwargsModel()
    x, shift = torch.randn(2, 3), torch.randn(2, 3)
    with Trace(model, "block", retain_input=True) as t:
        y = model(x, shift)
    assert t.input is x
    assert set(t.input_kwargs) == {"x", "scale", "shift"}
    assert t.input_kwargs["scale"] == 2.0 and t.input_kwargs["shift"] is shift
    torch.testing.assert_close(y, 2 * x + shift)


def test_positional_inputs_follow_the_original_convention():
    model = zoo.TinyTransformer()
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad(), TraceDict(model, ["blocks.0", "blocks.0.attn"], retain_input=True) as td:
        model(ids)
    emb = model.embed(ids)
    torch.testing.assert_close(td["blocks.0"].input, emb)
    assert td["blocks.0"].input_kwargs == {"attention_mask": None}
    attn_in = td["blocks.0.attn"].input
    assert isinstance(attn_in, tuple) and len(attn_in) == 3
    assert td["blocks.0.attn"].input_kwargs["need_weights"] is False


def test_transformer_tuple_output_with_none_is_kept():
    model = zoo.TinyTransformer()
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad(), TraceDict(model, ["blocks.*.attn", "blocks.1"], clone=True) as td:
        logits, hidden = model(ids)
    out = td["blocks.1"].output
    assert type(out) is tuple and out[1] is None
    torch.testing.assert_close(out[0], hidden[2])
    assert td["blocks.0.attn"].output[1] is None


@pytest.mark.parametrize("kind", zoo.STRUCTURES)
def test_structured_outputs_are_retained_as_they_are(kind):
    model = zoo.Structured()
    x = torch.randn(2, 3)
    with Trace(model, f"emit.{kind}", clone=True, detach=True) as t:
        model(x)
    out = t.output
    assert type(out) is type(zoo.Emit(kind)(x))
    plain = zoo.Emit(kind)(x)
    if kind == "dataclass":
        assert out.extra is None
        torch.testing.assert_close(out.hidden, x)
    elif isinstance(plain, dict):
        assert list(out) == list(plain)
        for key in plain:
            torch.testing.assert_close(out[key], plain[key])
    else:
        assert len(out) == len(plain)
        for got, want in zip(out, plain, strict=True):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", zoo.STRUCTURES)
def test_structured_edit_returning_same_structure(kind):
    model = zoo.Structured()
    x = torch.randn(2, 3)

    def negate_hidden(output):
        if isinstance(output, tuple) and hasattr(output, "_fields"):
            return type(output)(-output[0], output[1])
        if isinstance(output, tuple):
            return (-output[0], *output[1:])
        if dataclasses.is_dataclass(output):
            return dataclasses.replace(output, hidden=-output.hidden)
        return {**output, "hidden": -output["hidden"]}

    with Trace(model, f"emit.{kind}", edit_output=negate_hidden):
        y = model(x)
    torch.testing.assert_close(y, 3 * x)  # five emitters, one negated


def test_edit_with_wrong_shape_names_layer_and_shapes():
    model = zoo.counted_chain()
    with pytest.raises(EditError) as info:
        with Trace(model, "1", edit_output=lambda out: out[:, :2]):
            model(torch.randn(3, 4))
    message = str(info.value)
    assert "'1'" in message and "[3, 2]" in message and "[3, 4]" in message
    assert zoo.hook_counts(model) == 0


def test_edit_with_wrong_structure_is_an_error():
    model = zoo.Structured()
    with pytest.raises(EditError, match=r"emit\.tuple.*returned \[2, 3\].*tuple\(\[2, 3\], None"):
        with Trace(model, "emit.tuple", edit_output=lambda out: out[0]):
            model(torch.randn(2, 3))


def test_edit_signatures_and_in_place_edits():
    model = zoo.counted_chain()
    x = torch.randn(2, 4)
    seen = []

    def by_name(layer, output):
        seen.append(layer)
        return output * 0

    def rome_style(cur_out, cur_layer):
        seen.append(cur_layer)
        return cur_out * 0

    def in_place(output):
        output.zero_()

    with torch.no_grad():
        expected = model[3](model[2](torch.zeros(2, 4)))
        for edit in (by_name, rome_style, in_place, lambda out: out * 0):
            with Trace(model, "1", edit_output=edit):
                y = model(x)
            torch.testing.assert_close(y, expected)
    assert seen == ["1", "1"]


def test_stop_really_stops():
    model = zoo.counted_chain(depth=4)
    with Trace(model, "1", stop=True) as t:
        model(torch.randn(2, 4))
        pytest.fail("the forward pass should have stopped")
    assert [m.calls for m in model] == [1, 1, 0, 0]
    assert t.output.shape == (2, 4)
    assert zoo.hook_counts(model) == 0


def test_tracedict_stops_after_all_layers_ran_in_any_order():
    model = zoo.counted_chain(depth=5)
    with TraceDict(model, ["2", "0"], stop=True) as td:
        model(torch.randn(2, 4))
    assert [m.calls for m in model] == [1, 1, 1, 0, 0]
    assert td["2"].output.shape == (2, 4) and td["0"].output.shape == (2, 4)
    with TraceDict(model, ["3"], stop=True):
        model(torch.randn(2, 4))
        model(torch.randn(2, 4))  # not reached
    assert [m.calls for m in model] == [2, 2, 2, 1, 0]


def test_only_our_own_stop_is_swallowed():
    model = zoo.counted_chain(depth=3)
    with Trace(model, "0", stop=True) as outer:
        with Trace(model, "2") as inner:
            model(torch.randn(1, 4))
        pytest.fail("the inner trace must not swallow the outer one's stop")
    assert outer.calls == 1 and inner.calls == 0
    with pytest.raises(StopForward):
        with Trace(model, "0", stop=True):
            raise StopForward()


def test_exception_and_keyboard_interrupt_remove_every_hook():
    for error in (ValueError("boom"), KeyboardInterrupt()):
        model = zoo.Fails(error)
        with pytest.raises(type(error)):
            with TraceDict(model, ["pre", "boom"], retain_input=True):
                with Trace(model, "boom.inner", retain_grad=True):
                    model(torch.randn(2, 4))
        assert model.boom.calls == 1
        assert zoo.hook_counts(model) == 0


def test_hooks_we_did_not_add_survive():
    model = zoo.counted_chain()
    calls = []
    handle = model[1].register_forward_hook(lambda m, i, o: calls.append(1))
    with Trace(model, "1"), TraceDict(model, ["*"]):
        model(torch.randn(1, 4))
    model(torch.randn(1, 4))
    assert calls == [1, 1]
    handle.remove()
    assert zoo.hook_counts(model) == 0


def test_nested_traces_compose_in_creation_order():
    model = zoo.counted_chain()
    x = torch.randn(2, 4)
    with torch.no_grad():
        raw = model[0](x)
        with Trace(model, "0", edit_output=lambda o: o + 1) as first:
            with Trace(model, "0", edit_output=lambda o: o * 2) as second:
                y = model(x)
        expected = model[3](model[2](model[1]((raw + 1) * 2)))
    torch.testing.assert_close(first.output, raw + 1)
    torch.testing.assert_close(second.output, (raw + 1) * 2)
    torch.testing.assert_close(y, expected)


def test_retain_grad_keeps_gradient_after_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with Trace(model, "0", retain_grad=True) as t:
        model(x).sum().backward()
    expected = model[2].weight.sum(0) * (t.output > 0)
    torch.testing.assert_close(t.output.grad, expected.expand(5, 4))


def test_clone_protects_against_later_in_place_ops():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True))
    x = torch.randn(8, 3)
    with torch.no_grad():
        with Trace(model, "0", clone=True) as cloned, Trace(model, "0") as ref:
            model(x)
        raw = model[0](x)
    torch.testing.assert_close(cloned.output, raw)
    assert (ref.output >= 0).all()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_grad_modes_and_dtypes(mode, dtype):
    model = zoo.SharedThrice().to(dtype)
    x = torch.randn(2, 4, dtype=dtype)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        mode, torch.enable_grad
    )
    with context():
        with Trace(model, "step", clone=True, retain_grad=True, edit_output=lambda o: o) as t:
            model(x)
        expected = model.step(model.step(model.step(x)))
    assert t.output.dtype == dtype and len(t.outputs) == 3
    torch.testing.assert_close(t.output.detach(), expected.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda():
    model = zoo.TinyTransformer().cuda()
    ids = torch.randint(0, 32, (2, 5), device="cuda")
    with TraceDict(model, ["blocks.*"], clone=True, stop=True) as td:
        model(ids)
    assert td["blocks.1"].output[0].device.type == "cuda"


def test_missing_output_explains_why():
    model = zoo.counted_chain()
    t = Trace(model, "1", retain_output=False)
    with pytest.raises(AttributeError, match="retain_input=False"):
        _ = t.input
    with pytest.raises(AttributeError, match="retain_output=False"):
        _ = t.output
    t.close()
    t.close()
    with Trace(model, "2") as unused:
        assert not hasattr(unused, "output")
    assert zoo.hook_counts(model) == 0


def test_rome_style_call_sites_run_unchanged():
    """Call sites written the way ROME, MEMIT and EasyEdit write them."""
    model = zoo.TinyTransformer()
    ids = torch.randint(0, 32, (1, 6))
    layers = [f"blocks.{i}" for i in range(2)]
    patched = []

    def edit_output_fn(cur_out, cur_layer):
        patched.append(cur_layer)
        if cur_layer == layers[1]:
            cur_out[0][:, 2] = 0
        return cur_out

    with nethook.TraceDict(
        module=model,
        layers=layers,
        retain_input=True,
        retain_output=True,
        edit_output=edit_output_fn,
    ) as tr:
        model(ids)
    assert patched == layers
    assert torch.all(tr[layers[1]].output[0][:, 2] == 0)
    with (
        torch.no_grad(),
        nethook.Trace(
            model, "blocks.1.mlp.2", retain_input=True, retain_output=False, stop=True
        ) as tr,
    ):
        model(ids)
    assert tr.input.shape == (1, 6, 32)


def test_glob_resolving_to_one_layer_reports_its_path():
    model = zoo.counted_chain()
    seen = []
    with Trace(model, "[2]", edit_output=lambda out, layer: seen.append(layer)) as t:
        model(torch.randn(1, 4))
    assert t.layer == "2" and seen == ["2"]


def test_input_is_kept_before_in_place_modules_change_it():
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True))
    x = torch.randn(16, 3)
    with torch.no_grad(), TraceDict(model, ["", "1"], retain_input=True, clone=True) as td:
        model(x)
        pre_relu = model[0](x)
    assert (td["1"].input < 0).any()
    torch.testing.assert_close(td["1"].input, pre_relu)
    torch.testing.assert_close(td[""].input, x)
    assert len(td[""].inputs) == 1


def test_bad_edit_output_is_refused_before_hooks():
    model = zoo.counted_chain()
    with pytest.raises(TypeError, match="edit_output must be callable, got int"):
        TraceDict(model, ["0", "1"], edit_output=5)
    assert zoo.hook_counts(model) == 0


def test_closed_tracedict_frees_retained_tensors_without_the_cycle_collector():
    """No reference cycle: a batch's retained outputs go as soon as the TraceDict does."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    enabled = gc.isenabled()
    gc.disable()
    try:
        with TraceDict(model, ["0", "1"], stop=True, clone=True) as traces:
            model(torch.randn(2, 4))
        kept = weakref.ref(traces["1"].output)
        del traces
        assert kept() is None
    finally:
        if enabled:
            gc.enable()


def test_changed_tells_when_an_in_place_op_changed_a_kept_output():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True)).eval()
    x = torch.randn(4, 3)
    with Trace(model, "0") as kept, Trace(model, "0", clone=True) as copied, torch.no_grad():
        model(x)
    assert kept.changed() and not copied.changed()
    assert (copied.output < 0).any() and not (kept.output < 0).any()
    with Trace(model, "1") as last, torch.no_grad():
        model(x)
    assert not last.changed()
