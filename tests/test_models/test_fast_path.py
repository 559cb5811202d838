"""The fast PoolFormer paths compute the same function as the plain formulation.

Speed is measured by tools/analysis/benchmark.py, never asserted here.
"""
import copy
import pickle
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from poolformer_mm.analysis.reference import ReferencePoolFormer
from poolformer_mm.models import PoolFormer
from poolformer_mm.models.layers import (
    DeployPoolFormerBlock,
    PoolingMixer,
    blocks,
    group_norm_1_channels_last,
    group_norm_1_moments,
)

REPO = Path(__file__).resolve().parents[2]
HYBRID = ('pool', 'pool', 'attn', 'attn')


def _randomised(arch='s12', seed=0, **kwargs):
    torch.manual_seed(seed)
    model = PoolFormer(arch, **kwargs)
    model.init_weights()
    with torch.no_grad():  # norms and layer scales far from their initial values
        for name, param in model.named_parameters():
            if 'norm' in name or 'layer_scale' in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model


def _rel_diff(a, b):
    return max((x - y).abs().max().item() / x.abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize('shape', [(2, 3, 64, 64), (1, 3, 223, 301), (1, 3, 32, 32)])
def test_fast_path_outputs_match_the_plain_formulation(shape):
    model = _randomised().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        fast = model(x)
        plain = model.set_fast_path(False)(x)
    assert [o.shape for o in fast] == [o.shape for o in plain]
    assert all(o.is_contiguous() for o in fast)
    assert _rel_diff(plain, fast) <= 1e-5


@pytest.mark.parametrize('with_cp', [False, True])
def test_fast_path_gradients_match_the_plain_formulation(with_cp):
    plain = _randomised(out_indices=(1, 2, 3)).set_fast_path(False)
    fast = copy.deepcopy(plain).set_fast_path(True).set_grad_checkpointing(with_cp)
    x = torch.randn(2, 3, 96, 64)
    grads = []
    for model in (plain, fast):
        model.train()
        sum((o * o).mean() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, expected in grads[0].items():
        # every parameter gets a gradient (DDP needs it); norm1.bias's is 0 up to rounding
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_fast_path_with_stochastic_depth_matches_the_plain_formulation():
    plain = _randomised(drop_path_rate=0.3).set_fast_path(False)
    fast = copy.deepcopy(plain).set_fast_path(True)
    x = torch.randn(4, 3, 64, 64)
    outputs, grads = [], []
    for model in (plain, fast):
        model.train()
        torch.manual_seed(1)  # the same samples dropped in the same branches
        out = model(x)
        sum((o * o).mean() for o in out).backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert _rel_diff(outputs[0], outputs[1]) <= 1e-5
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_deploy_folds_every_block_and_keeps_the_outputs():
    model = _randomised('s24').eval()
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        expected = model(x)
        folded = model.switch_to_deploy()(x)
    folded_blocks = [b for s in model.stages for b in s.blocks]
    assert len(folded_blocks) == 24
    assert all(isinstance(b, DeployPoolFormerBlock) for b in folded_blocks)
    assert _rel_diff(expected, folded) <= 1e-5
    assert not any('layer_scale' in n for n, _ in model.named_parameters())


def test_deploy_block_inference_and_autograd_forms_agree():
    block = DeployPoolFormerBlock(_randomised().stages[1].blocks[0]).eval()
    tokens = torch.randn(2, 12, 10, 128)
    with torch.no_grad():
        inference = block.forward_tokens(tokens)  # in place and in scratch
    with_grad = block.forward_tokens(tokens.clone().requires_grad_())
    torch.testing.assert_close(inference, with_grad.detach(), rtol=1e-5, atol=1e-5)
    # and with autograd the deploy block still passes gradients to its input
    leaf = tokens.clone().requires_grad_()
    block.forward_tokens(leaf).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_deploy_block_leaves_its_input_alone():
    block = DeployPoolFormerBlock(_randomised().stages[0].blocks[0]).eval()
    # 64x64 tokens take the mixer's convolution form, 8x8 the pooling form
    for tokens in (torch.randn(1, 64, 64, 64), torch.randn(2, 8, 8, 64)):
        before = tokens.clone()
        with torch.no_grad():
            block.forward_tokens(tokens)
        assert torch.equal(tokens, before)


def test_deploy_block_does_not_reuse_memory_a_mixer_subclass_may_share():
    class ReturnsItsInput(PoolingMixer):  # pool(x) - x replaced by x itself
        def forward_tokens(self, tokens):
            return tokens

    block = DeployPoolFormerBlock(_randomised().stages[0].blocks[0]).eval()
    block.token_mixer = ReturnsItsInput(64)
    tokens = torch.randn(1, 8, 8, 64)
    before = tokens.clone()
    with torch.no_grad():
        out = block.forward_tokens(tokens)
    assert torch.equal(tokens, before) and out.data_ptr() != tokens.data_ptr()


def _scratch_ranges(scratch):
    return [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size())
            for b in scratch._buffers().values()]


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_deploy_scratch_is_shared_reused_and_never_returned(precision):
    model = _randomised().eval()
    reference = copy.deepcopy(model)
    model.switch_to_deploy()
    folded_blocks = [b for s in model.stages for b in s.blocks]
    assert all(b.scratch is model.scratch for b in folded_blocks)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16')
    tolerance = 1e-5 if precision == 'fp32' else 5e-2
    inputs = [torch.randn(1, 3, 128, 96), torch.randn(2, 3, 64, 64), torch.randn(1, 3, 160, 128)]
    with torch.no_grad(), autocast:
        first = [o.clone() for o in model(inputs[0])]
        ranges = _scratch_ranges(model.scratch)
        assert model.scratch.nbytes() > 0
        model(inputs[0])
        # the second call of the same size found its buffers and allocated none
        assert _scratch_ranges(model.scratch) == ranges
        outputs = [model(x) for x in inputs]  # smaller, then larger than the first
        again = model(inputs[0])
    with torch.no_grad():
        expected = [reference(x) for x in inputs]
    # earlier outputs are not overwritten by later calls: nothing returned lives in scratch
    assert all(torch.equal(a, b) for a, b in zip(first, outputs[0]))
    for out in [*outputs[0], *again]:
        assert not any(low <= out.data_ptr() < high for low, high in _scratch_ranges(model.scratch))
    for out, exact in zip(outputs, expected):
        assert _rel_diff(exact, [o.float() for o in out]) <= tolerance
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    model.scratch.clear()
    assert model.scratch.nbytes() == 0


def test_deploy_scratch_holds_stage_1s_hidden_and_normalised_tokens():
    # the README's figure: about 21 MB for S12 at 512x512, batch 1
    model = _randomised().eval().switch_to_deploy()
    with torch.no_grad():
        model(torch.randn(1, 3, 512, 512))
    assert model.scratch.nbytes() == 128 * 128 * (256 + 64) * 4 == 20_971_520


def test_deploy_scratch_is_per_thread():
    model = _randomised().eval().switch_to_deploy()
    inputs = [torch.randn(1, 3, 96 + 32 * i, 96) for i in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results, errors = {}, []

    def run(index):
        try:
            with torch.no_grad():
                for _ in range(5):
                    results[index] = model(inputs[index])
        except Exception as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, )) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, exact in enumerate(expected):
        assert all(torch.equal(a, b) for a, b in zip(exact, results[index]))


def test_deploy_scratch_made_under_inference_mode_serves_no_grad_calls():
    model = _randomised().eval().switch_to_deploy()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        first = model(x)  # the scratch tensors are made here
    with torch.no_grad():  # and written here: they must not be inference tensors
        second = model(x)
    with torch.inference_mode():
        third = model(x)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, third))


def test_deploy_block_takes_strided_and_other_dtype_tokens():
    plain = _randomised().stages[0].blocks[0].eval()
    block = DeployPoolFormerBlock(plain).eval()

    def exact(tokens):
        return plain(tokens.double().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    with torch.no_grad():
        plain.double()
        # an NHWC view of an NCHW tensor (batch 2: the output follows its strides), and a
        # large one (the mixer's convolution form)
        for tokens in (torch.randn(2, 64, 9, 7).permute(0, 2, 3, 1),
                       torch.randn(1, 64, 64, 64).permute(0, 2, 3, 1)):
            out = block.forward_tokens(tokens)
            assert out.is_contiguous() and out.dtype == torch.float32
            assert _rel_diff([exact(tokens)], [out.double()]) <= 1e-5
        # bf16 tokens into an fp32 block: fp32 out, as the promotion of the two gives
        tokens = torch.randn(1, 8, 8, 64).bfloat16()
        assert block.forward_tokens(tokens).dtype == torch.float32
    # a float64 model under bf16 autocast keeps float64 outputs
    model = _randomised().eval().switch_to_deploy().double()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert [o.dtype for o in outputs] == [torch.float64] * 4


def test_deploy_block_under_vmap_matches_the_loop():
    block = DeployPoolFormerBlock(_randomised().stages[0].blocks[0]).eval()
    tokens = torch.randn(3, 1, 8, 8, 64)
    with torch.no_grad():
        mapped = torch.vmap(block.forward_tokens)(tokens)
        looped = torch.stack([block.forward_tokens(t) for t in tokens])
    torch.testing.assert_close(mapped, looped, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
def test_deploy_trace_after_a_call_keeps_no_scratch_constant():
    model = _randomised().eval().switch_to_deploy()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)  # this thread's scratch exists now
        traced = torch.jit.trace(model, x, check_trace=False)
        constants = [node for node in traced.inlined_graph.nodes()
                     if node.kind() == 'prim::Constant'
                     and node.output().type().kind() == 'TensorType']
        assert not constants  # a baked-in scratch tensor would be shared by every thread
        y = torch.randn(1, 3, 64, 64)
        assert _rel_diff(model(y), traced(y)) <= 1e-6


@pytest.mark.parametrize('offset', [0.0, 50.0])  # 50: the statistics' cancellation fallback
def test_deploy_block_and_channels_last_output_norm_gradients_are_exact(offset):
    model = _randomised().double()
    plain = model.stages[1].blocks[0]
    block = DeployPoolFormerBlock(plain)
    tokens = torch.randn(1, 8, 8, 128, dtype=torch.float64) + offset
    gradients = []
    for forward in (lambda t: plain(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1),
                    block.forward_tokens):
        leaf = tokens.clone().requires_grad_()
        forward(leaf).square().sum().backward()
        gradients.append(leaf.grad)
    assert _rel_diff([gradients[0]], [gradients[1]]) <= 1e-10
    # the output norms of --channels-last training take the same statistics
    norm = model.output_norms['1']
    x = (torch.randn(2, 128, 8, 8, dtype=torch.float64) + offset).contiguous(
        memory_format=torch.channels_last)
    gradients = []
    for forward in (norm, lambda t: group_norm_1_channels_last(norm, t)):
        leaf = x.clone().requires_grad_()
        (forward(leaf) * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum().backward()
        gradients.append(leaf.grad)
    assert _rel_diff([gradients[0]], [gradients[1]]) <= 1e-10


def test_deployed_model_copies_and_pickles_with_empty_scratch():
    model = _randomised().eval().switch_to_deploy()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert model.scratch.nbytes() > 0
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.scratch is not model.scratch and clone.scratch.nbytes() == 0
        assert all(b.scratch is clone.scratch for s in clone.stages for b in s.blocks)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(expected, clone(x)))
    assert 'scratch' not in ' '.join(model.state_dict())


def test_deploy_runs_under_bf16_autocast():
    model = _randomised().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model.switch_to_deploy()
        blocks.fused_linear_available.cache_clear()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            # the probe's answer does not depend on the caller's autocast
            assert blocks.fused_linear_available() == torch.backends.mkldnn.is_available()
            folded = model(x)
    assert [o.shape for o in folded] == [o.shape for o in expected]
    assert _rel_diff(expected, [o.float() for o in folded]) <= 5e-2  # bf16 has 8 bits


@pytest.mark.parametrize('flags, warns', [({'avx2'}, False), ({'avx2', 'amx_bf16'}, True),
                                           (None, True)])
def test_fused_kernel_missing_for_bf16_warns_only_where_the_cpu_has_bf16_units(
        monkeypatch, flags, warns):
    def no_primitive(*args):
        raise RuntimeError('could not create a primitive descriptor')

    monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise', no_primitive)
    monkeypatch.setattr(blocks, 'cpu_flags', lambda: None if flags is None else frozenset(flags))
    blocks.fused_linear_available.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            assert not blocks.fused_linear_available(torch.bfloat16)
    finally:
        blocks.fused_linear_available.cache_clear()
    # without bf16 units the tools already say bf16 is emulated; "missing" would mislead
    messages = [str(w.message) for w in caught if 'fused linear + GELU' in str(w.message)]
    assert messages == (["oneDNN's fused linear + GELU kernel (torch.bfloat16) is not used: it "
                         'is missing (could not create a primitive descriptor). Deployed '
                         'PoolFormer blocks run it unfused: same outputs, slower on a CPU.']
                        if warns else [])


def test_deploy_under_bf16_without_the_fused_kernel_gives_the_same_outputs(monkeypatch):
    model = _randomised().eval().switch_to_deploy()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        fused = model(x)
        monkeypatch.setattr(blocks, 'fused_linear_available', lambda dtype: False)
        unfused = model(x)  # fc1 into scratch, GELU in place
    assert _rel_diff([o.float() for o in fused], [o.float() for o in unfused]) <= 2e-2


def test_training_path_keeps_bf16_autocast_error_at_the_plain_formulations_level():
    plain = _randomised().set_fast_path(False)
    fast = copy.deepcopy(plain).set_fast_path(True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        exact = plain(x)
        errors = []
        for model in (plain, fast):
            with torch.autocast('cpu', dtype=torch.bfloat16):
                errors.append(_rel_diff(exact, [o.float() for o in model(x)]))
    # rounding the residual stream or the folded layer scale to bf16 would double the error
    assert errors[1] <= 1.5 * errors[0] + 1e-3, errors


@pytest.mark.parametrize('offset', [0.0, 3.0, 1000.0])
@pytest.mark.parametrize('size', [(24, 20, 64), (96, 96, 64)])  # GroupNorm's and reductions
def test_deploy_statistics_equal_group_norms(offset, size):
    tokens = torch.randn(2, *size) + offset
    mean, inv_std = group_norm_1_moments(tokens, 1e-5)
    flat = tokens.reshape(2, 1, -1)
    _, expected_mean, expected_inv_std = torch.native_group_norm(flat, None, None, 2, 1,
                                                                 flat.shape[-1], 1, 1e-5)
    torch.testing.assert_close(mean, expected_mean.view(2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inv_std, expected_inv_std.view(2), rtol=1e-5, atol=0)


def test_deploy_stores_patch_embedding_weights_channels_last():
    model = _randomised().switch_to_deploy()
    convs = [model.stem.conv] + [s.downsample.conv for s in model.stages[1:]]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_each_stage_runs_in_the_layout_its_blocks_allow_and_the_backbone_switches_it():
    # the released hybrids normalise with LayerNorm; the token forms know GroupNorm(1) only
    assert not any(s.token_layout for s in PoolFormer('s12', token_mixers=HYBRID).stages)
    hybrid = PoolFormer('s12', token_mixers=HYBRID, norm_cfg=dict(type='GN'))
    assert hybrid.fast_path
    assert [s.token_layout for s in hybrid.stages] == [True, True, False, False]
    hybrid.set_fast_path(False)
    assert not hybrid.fast_path and not any(s.token_layout for s in hybrid.stages)
    assert not any(s.token_layout for s in PoolFormer('s12', fast_path=False).stages)


def test_with_cp_is_the_constructor_form_of_set_grad_checkpointing():
    assert all(s.grad_checkpointing for s in PoolFormer('s12', with_cp=True).stages)
    model = PoolFormer('s12').set_grad_checkpointing()
    assert all(s.grad_checkpointing for s in model.stages)
    assert not any(s.grad_checkpointing for s in model.set_grad_checkpointing(False).stages)


def test_deploy_folds_pooling_stages_of_a_hybrid_and_keeps_its_outputs():
    model = _randomised(token_mixers=HYBRID, norm_cfg=dict(type='GN')).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        expected = model(x)
        folded = model.switch_to_deploy()(x)
    kinds = [{type(b).__name__ for b in s.blocks} for s in model.stages]
    assert kinds == [{'DeployPoolFormerBlock'}] * 2 + [{'MetaFormerBlock'}] * 2
    assert [s.token_layout for s in model.stages] == [True, True, False, False]
    assert _rel_diff(expected, folded) <= 1e-5


def test_reference_implementation_matches_poolformer():
    model = _randomised(out_indices=(0, 2)).eval()
    reference = ReferencePoolFormer.like(model).eval()
    x = torch.randn(1, 3, 96, 96)
    model.set_fast_path(False)
    with torch.no_grad():
        for a, b in zip(model(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_benchmark_script_prints_every_variant_and_its_difference(tmp_path):
    result = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark.py', '--arch', 's12', '--shape', '64',
         '--warmup', '0', '--repeat', '2', '--variants', 'reference', 'plain', 'fast', 'deploy',
         '--json', str(tmp_path / 'out.json')], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if re.match(r'(reference|plain|fast|deploy) +[\d.]+ ', line)}
    assert set(rows) == {'reference', 'plain', 'fast', 'deploy'}
    for name, row in rows.items():
        assert float(row[6]) < 1e-4  # largest |difference| against the reference
    import json
    saved = json.loads((tmp_path / 'out.json').read_text())
    assert saved['results']['deploy']['max_rel_diff'] <= 1e-5
    assert 'matmul fp32' in result.stdout and '% matmul' in result.stdout
