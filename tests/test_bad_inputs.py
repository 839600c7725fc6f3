"""Bad input at every public door: the exact error (type and message) and nothing changed.

Each case is (id, action on a fresh World, exception, regex of the message). The World is a small model with
an Adam optimizer that has taken one step (so there is state to corrupt) and holds gradients; the test takes a
bitwise snapshot of parameters, gradients, optimizer state and param groups before the action and compares
after it raised.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _orders_common import batch, mlp
from conftest import assert_unchanged, snapshot
from torch import nn

import pyco

NAN, INF = math.nan, math.inf
P = pyco.optim
B = pyco.blocks


class World:
    def __init__(self):
        self.model = mlp()  # Linear(3,5) Tanh Linear(5,4) Tanh Linear(4,2), float64
        self.params = list(self.model.parameters())
        self.blocks = B.by_module(self.model)
        self.opt = P.Adam(self.params, lr=0.01)
        self.x, self.y = batch()
        self.closure()
        self.opt.step()
        self.closure()  # leaves fresh gradients on every parameter

    def closure(self):
        self.opt.zero_grad()
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        return loss

    def steps(self, scale=0.01):
        return [scale * torch.ones_like(p) for p in self.blocks.params()]

    def loss_fn(self):
        return nn.functional.mse_loss(self.model(self.x), self.y)

    def foreign(self, shape=(3,), **kw):
        return nn.Parameter(torch.zeros(shape, dtype=torch.float64, **kw))


def sd_with(w, edit):
    """The optimizer's state_dict, copied (its entries are the live state's) and edited."""
    sd = copy.deepcopy(w.opt.state_dict())
    edit(sd)
    return sd


def replace_state(key, value):
    def edit(sd):
        sd["state"][0][key] = value
    return edit


GS = lambda w, **kw: pyco.GaussSeidel(w.opt, w.blocks, **kw)  # noqa: E731
BC = lambda w, **kw: pyco.BlockCoordinate(w.opt, w.blocks, **kw)  # noqa: E731
CHAIN = lambda w, **kw: pyco.ChainGaussSeidel(w.opt, w.model, nn.functional.mse_loss, **kw)  # noqa: E731


def vector_closure(w):
    def closure():
        w.opt.zero_grad()
        out = w.model(w.x)
        nn.functional.mse_loss(out, w.y).backward()
        return out.sum(dim=1)
    return closure


def no_loss_closure(w):
    def closure():
        w.opt.zero_grad()
        nn.functional.mse_loss(w.model(w.x), w.y).backward()
    return closure


# ---- the optimizers ---------------------------------------------------------------------------------------------

OPTIMIZER_CASES = [
    # constructors: wrong types, empty and duplicated parameters, devices, dtypes, NaN hyper-parameters
    ("SGD-empty-params", lambda w: P.SGD([], lr=0.1), ValueError, r"optimizer got an empty parameter list"),
    ("Adam-empty-params", lambda w: P.Adam([]), ValueError, r"optimizer got an empty parameter list"),
    ("AdamW-one-tensor", lambda w: P.AdamW(w.params[0]), TypeError,
     r"params argument given to the optimizer should be an iterable of Tensors or dicts"),
    ("SGD-ints", lambda w: P.SGD([1, 2], lr=0.1), TypeError, r"optimizer can only optimize Tensors, but one of the "
     r"params is int"),
    ("SGD-param-in-two-groups", lambda w: P.SGD([{"params": w.params[:2]}, {"params": w.params[1:]}], lr=0.1),
     ValueError, r"some parameters appear in more than one parameter group"),
    ("Adam-group-without-params", lambda w: P.Adam([{"lr": 0.1}]), ValueError,
     r"param group 0 has no 'params' entry"),
    ("Adam-meta-param", lambda w: P.Adam([w.foreign(device="meta")]), ValueError,
     r"Adam: param 0 of group 0 \(shape \[3\], torch.float64\) is on meta, but pyco has CPU and CUDA kernels only"),
    ("SGD-int-param", lambda w: P.SGD([torch.zeros(3, dtype=torch.int64)], lr=0.1), TypeError,
     r"SGD: param 0 of group 0 \(shape \[3\], torch.int64\) has unsupported dtype torch.int64"),
    ("Adam-non-leaf", lambda w: P.Adam([w.params[0] * 2]), ValueError, r"can't optimize a non-leaf Tensor"),
    ("SGD-nan-lr", lambda w: P.SGD(w.params, lr=NAN), ValueError, r"Invalid learning rate: nan"),
    ("Adam-nan-eps", lambda w: P.Adam(w.params, eps=NAN), ValueError, r"Invalid epsilon value: nan"),
    ("SGD-inf-lr-vector", lambda w: P.SGD(w.params, lr=torch.tensor([INF, 1.0])), ValueError,
     r"Tensor lr must be 1-element"),
    ("AdamW-nan-weight-decay", lambda w: P.AdamW(w.params, weight_decay=NAN), ValueError,
     r"Invalid weight_decay value: nan"),
    ("SGD-nan-momentum", lambda w: P.SGD(w.params, lr=0.1, momentum=NAN), ValueError, r"Invalid momentum value: nan"),
    ("Adam-nan-beta", lambda w: P.Adam(w.params, betas=(NAN, 0.9)), ValueError,
     r"Invalid beta parameter at index 0: nan"),
    ("Adam-betas-str", lambda w: P.Adam(w.params, betas="ab"), ValueError, r"Invalid betas: 'ab' \(expected a pair"),
    ("Adam-lr-none", lambda w: P.Adam(w.params, lr=None), TypeError, r"Invalid learning rate: None \(expected a number\)"),
    ("SGD-lr-bool", lambda w: P.SGD(w.params, lr=True), TypeError, r"Invalid learning rate: True \(expected a number\)"),
    ("Adam-lr-vector", lambda w: P.Adam(w.params, lr=torch.tensor([0.1, 0.2])), ValueError,
     r"Tensor lr must be 1-element, got shape \[2\]"),
    ("SGD-nonfinite-policy", lambda w: P.SGD(w.params, lr=0.1, nonfinite="ignore"), ValueError,
     r"Invalid nonfinite: 'ignore' \(expected one of \('apply', 'skip', 'skip-block'\)\)"),
    # blocks that do not cover the parameters, or cover them twice, or are not blocks at all
    ("Adam-blocks-int", lambda w: P.Adam(w.params, blocks=5), TypeError,
     r"blocks must be a pyco.blocks.Blocks, a dict name -> parameters or a list of \(name, parameters\) pairs, got int"),
    ("Adam-blocks-missing", lambda w: P.Adam(w.params, blocks={"a": w.params[:4]}), ValueError,
     r"param 4.weight, param 4.bias of the optimizer in no block|shape \[2, 4\].* in no block"),
    ("SGD-blocks-overlap", lambda w: P.SGD(w.params, lr=0.1, blocks={"a": w.params[:4], "b": w.params[3:]}),
     ValueError, r"blocks 'a' and 'b' overlap"),
    ("Adam-blocks-foreign", lambda w: P.Adam(w.params, blocks={"a": w.params, "b": [w.foreign()]}), ValueError,
     r"block 'b' holds a parameter of shape \[3\], which is not a parameter of the optimizer"),
    # step
    ("Adam-step-closure-int", lambda w: w.opt.step(5), TypeError, r"Adam.step: closure must be callable \(or None\), "
     r"got int"),
    ("Adam-step-grad-dtype", lambda w: _set_grad_data(w, torch.ones(4, 2, dtype=torch.float32)) or w.opt.step(),
     ValueError, r"Adam: param 5 of group 0 \(shape \[2\], torch.float64\) has a gradient of torch.float32, "
     r"shape \[4, 2\]"),
    ("Adam-step-grad-shape", lambda w: _set_grad_data(w, torch.ones(8, dtype=torch.float64)) or w.opt.step(),
     ValueError, r"has a gradient of torch.float64, shape \[8\] on cpu; it must match the parameter's dtype, shape"),
    ("Adam-step-blocks-dict", lambda w: w.opt.step_blocks({"a": w.params}, ["a"]), TypeError,
     r"step_blocks: blocks must be a pyco.blocks.Blocks, got dict"),
    ("Adam-step-blocks-unknown", lambda w: w.opt.step_blocks(w.blocks, ["9"]), KeyError,
     r"step_blocks: no block named '9'; blocks are \['0', '2', '4'\]"),
    # load_state_dict: mismatched state dicts are refused whole
    ("Adam-load-none", lambda w: w.opt.load_state_dict(None), ValueError,
     r"state_dict must be a dict with 'state' \(dict\) and 'param_groups' \(list\)"),
    ("Adam-load-group-int", lambda w: w.opt.load_state_dict({"state": {}, "param_groups": [5]}), ValueError,
     r"state_dict: param group 0 must be a dict with a 'params' list, got int"),
    ("Adam-load-SGD", lambda w: w.opt.load_state_dict(P.SGD(w.params, lr=0.1).state_dict()), ValueError,
     r"state_dict: param group 0 has no 'eps' .*; was it saved by another optimizer than Adam\?"),
    ("Adam-load-two-groups", lambda w: w.opt.load_state_dict(
        P.Adam([{"params": w.params[:2]}, {"params": w.params[2:]}]).state_dict()), ValueError,
     r"state_dict has 2 param groups, this optimizer has 1"),
    ("Adam-load-fewer-params", lambda w: w.opt.load_state_dict(P.Adam(w.params[:3]).state_dict()), ValueError,
     r"param group 0 of the state_dict has 3 parameters, this optimizer's has 6"),
    ("Adam-load-nan-lr", lambda w: w.opt.load_state_dict(sd_with(w, lambda sd: sd["param_groups"][0].update(lr=NAN))),
     ValueError, r"Invalid learning rate: nan"),
    ("Adam-load-wrong-shape", lambda w: w.opt.load_state_dict(sd_with(w, replace_state("exp_avg", torch.zeros(7)))),
     ValueError, r"state_dict: param 0 of group 0 .*'exp_avg' has shape \[7\], expected \[5, 3\]"),
    ("Adam-load-missing-moment", lambda w: w.opt.load_state_dict(sd_with(w, lambda sd: sd["state"][0].pop(
        "exp_avg_sq"))), ValueError, r"state_dict: param 0 of group 0 .*: missing 'exp_avg_sq'"),
    ("Adam-load-negative-step", lambda w: w.opt.load_state_dict(sd_with(w, replace_state("step", torch.tensor(-1.0)))),
     ValueError, r"'step' must be a non-negative number"),
    ("Adam-load-moment-list", lambda w: w.opt.load_state_dict(sd_with(w, replace_state("exp_avg", [0.0] * 15))),
     ValueError, r"'exp_avg' is list, expected a tensor"),
    ("SGD-load-momentum-shape", lambda w: P.SGD(w.params, lr=0.1, momentum=0.9).load_state_dict(
        {"state": {0: {"momentum_buffer": torch.zeros(2)}}, "param_groups": [
            {**P.SGD(w.params, lr=0.1, momentum=0.9).state_dict()["param_groups"][0]}]}), ValueError,
     r"'momentum_buffer' has shape \[2\], expected \[5, 3\]"),
    # add_param_group: a rejected group leaves the optimizer as it was
    ("Adam-add-group-duplicate", lambda w: w.opt.add_param_group({"params": [w.params[0]]}), ValueError,
     r"some parameters appear in more than one parameter group"),
    ("Adam-add-group-no-params", lambda w: w.opt.add_param_group({"lr": 0.1}), ValueError,
     r"param group 1 has no 'params' entry"),
    ("Adam-add-group-list", lambda w: w.opt.add_param_group([w.foreign()]), TypeError,
     r"param_group must be a dict"),
    ("Adam-add-group-nan-lr", lambda w: w.opt.add_param_group({"params": [w.foreign()], "lr": NAN}), ValueError,
     r"Invalid learning rate: nan"),
    ("Adam-add-group-meta", lambda w: w.opt.add_param_group({"params": [w.foreign(device="meta")]}), ValueError,
     r"Adam: param 0 of group 1 \(shape \[3\], torch.float64\) is on meta"),
]


def _set_grad_data(w, value):
    w.params[-1].grad.data = value  # .data bypasses torch's own check, as a buggy extension might


# ---- the orders ---------------------------------------------------------------------------------------------------

ORDER_CASES = [
    ("GaussSeidel-not-optimizer", lambda w: pyco.GaussSeidel(w.model, w.blocks), TypeError,
     r"GaussSeidel wraps a torch.optim.Optimizer, got Sequential"),
    ("BlockCoordinate-wraps-order", lambda w: pyco.BlockCoordinate(GS(w), w.blocks), TypeError,
     r"BlockCoordinate cannot wrap another order \(GaussSeidel\); wrap the inner optimizer"),
    ("GaussSeidel-blocks-int", lambda w: pyco.GaussSeidel(w.opt, 5), TypeError,
     r"blocks must be a pyco.blocks.Blocks, a dict name -> parameters or a list"),
    ("GaussSeidel-blocks-missing", lambda w: pyco.GaussSeidel(w.opt, {"a": w.params[:2]}), ValueError,
     r"in no block: every parameter needs exactly one block"),
    ("BlockCoordinate-blocks-foreign", lambda w: pyco.BlockCoordinate(w.opt, {"a": w.params, "b": [w.foreign()]}),
     ValueError, r"block 'b' holds a parameter of shape \[3\], which is not a parameter of the optimizer \(Adam\)"),
    ("GaussSeidel-empty-block", lambda w: pyco.GaussSeidel(w.opt, {"a": w.params, "b": []}), ValueError,
     r"block 'b' holds no parameters; remove it from the blocks"),
    ("GaussSeidel-sweep-bad", lambda w: GS(w, sweep="sideways"), ValueError, r"Invalid sweep: 'sideways'"),
    ("GaussSeidel-sweep-int", lambda w: GS(w, sweep=3), TypeError, r"Invalid sweep: 3 \(expected one of"),
    ("GaussSeidel-sweep-incomplete", lambda w: GS(w, sweep=["0", "2", "2"]), ValueError,
     r"it must name every block exactly once .*unknown \[\], repeated \['2'\], missing \['4'\]"),
    ("GaussSeidel-seed-str", lambda w: GS(w, seed="x"), TypeError, r"GaussSeidel: Invalid seed: 'x' \(expected an int\)"),
    ("BlockCoordinate-seed-none", lambda w: BC(w, seed=None), TypeError, r"BlockCoordinate: Invalid seed: None"),
    ("BlockCoordinate-schedule", lambda w: BC(w, schedule="round-robin"), ValueError,
     r"Invalid schedule: 'round-robin' \(expected one of \('cyclic'"),
    ("BlockCoordinate-active-too-many", lambda w: BC(w, active=4), ValueError,
     r"Invalid active: 4 \(expected an int, 0 <= active <= 3"),
    ("BlockCoordinate-active-bool", lambda w: BC(w, active=True), ValueError, r"Invalid active: True"),
    ("BlockCoordinate-active-nothing", lambda w: BC(w, active=0), ValueError, r"active=0 with no always blocks"),
    ("BlockCoordinate-every-zero", lambda w: BC(w, every=0), ValueError, r"Invalid every: 0 \(expected an int >= 1\)"),
    ("BlockCoordinate-always-unknown", lambda w: BC(w, always=["9"]), ValueError,
     r"Invalid always: \['9'\] \(expected distinct block names among \['0', '2', '4'\]\)"),
    ("BlockCoordinate-always-int", lambda w: BC(w, always=3), TypeError, r"Invalid always: 3 \(expected a block name"),
    ("BlockCoordinate-state-policy", lambda w: BC(w, state="drop"), ValueError, r"Invalid state: 'drop'"),
    ("ChainGaussSeidel-not-sequential", lambda w: pyco.ChainGaussSeidel(w.opt, nn.ModuleList(w.model),
                                                                        nn.functional.mse_loss), TypeError,
     r"ChainGaussSeidel needs an nn.Sequential that applies its children in order, got ModuleList"),
    ("ChainGaussSeidel-loss-none", lambda w: pyco.ChainGaussSeidel(w.opt, w.model, None), TypeError,
     r"ChainGaussSeidel: loss_fn must be callable as loss_fn\(output, target\), got NoneType"),
    ("ChainGaussSeidel-foreign-block", lambda w: pyco.ChainGaussSeidel(
        P.Adam([*w.params, f := w.foreign()]), w.model, nn.functional.mse_loss,
        blocks={"all": w.params, "x": [f]}), ValueError, r"block 'x' holds a parameter of shape \[3\], which no child"),
    # steps
    ("GaussSeidel-step-no-closure", lambda w: GS(w).step(), RuntimeError, r"GaussSeidel.step needs a closure"),
    ("GaussSeidel-step-closure-int", lambda w: GS(w).step(5), TypeError,
     r"GaussSeidel.step \(block '4'\): the closure must be callable, got int"),
    ("GaussSeidel-step-vector-loss", lambda w: GS(w).step(vector_closure(w)), ValueError,
     r"GaussSeidel.step \(block '4'\): the closure returned a tensor of shape \[8\]; it must return the loss, a scalar"),
    ("GaussSeidel-step-no-loss", lambda w: GS(w, sweep="forward").step(no_loss_closure(w)), TypeError,
     r"GaussSeidel.step \(block '0'\): the closure returned NoneType; it must compute the gradients"),
    ("ChainGaussSeidel-step-closure", lambda w: CHAIN(w).step(w.closure), TypeError,
     r"ChainGaussSeidel.step takes the batch \(input, target\), not a closure"),
    ("BlockCoordinate-step-vector-loss", lambda w: BC(w).step(vector_closure(w)), ValueError,
     r"BlockCoordinate.step: the closure returned a tensor of shape \[8\]"),
    ("BlockCoordinate-step-no-grads", lambda w: BC(w).step(lambda: w.opt.zero_grad() or torch.tensor(0.0)),
     RuntimeError, r"block '0' is active at step 0 but none of its parameters \(param 0.weight, \.\.\.\) has a "
     r"gradient"),
    # wrappers' load_state_dict
    ("GaussSeidel-load-bare", lambda w: GS(w).load_state_dict(w.opt.state_dict()), ValueError,
     r"GaussSeidel.load_state_dict: the state_dict has no 'pyco_order' entry"),
    ("GaussSeidel-load-other-order", lambda w: GS(w).load_state_dict(BC(w).state_dict()), ValueError,
     r"the state_dict was saved by BlockCoordinate with blocks \['0', '2', '4'\]; this is GaussSeidel"),
    ("BlockCoordinate-load-other-schedule", lambda w: BC(w).load_state_dict(BC(w, schedule="greedy").state_dict()),
     ValueError, r"saved with schedule 'greedy', this wrapper has 'cyclic'"),
    ("GaussSeidel-load-bad-generator", lambda w: GS(w).load_state_dict(
        {**GS(w).state_dict(), "pyco_order": {**GS(w).state_dict()["pyco_order"], "generator": 3}}), ValueError,
     r"'generator' must be the uint8 tensor of torch.Generator.get_state\(\), got int"),
]


# ---- blocks and the probe -----------------------------------------------------------------------------------------

BLOCK_CASES = [
    ("by_names-list", lambda w: B.by_names(w.model, ["0.*"]), TypeError,
     r"by_names: patterns must be a dict block name -> glob pattern\(s\), got list"),
    ("by_names-int-pattern", lambda w: B.by_names(w.model, {"a": 5}), TypeError,
     r"by_names: block 'a': patterns must be a str or a list of str, got 5"),
    ("by_names-not-module", lambda w: B.by_names(None, {"a": "*"}), TypeError,
     r"by_names: model must be an nn.Module, got NoneType"),
    ("by_names-int-name", lambda w: B.by_names(w.model, {1: "*"}), TypeError, r"by_names: block names must be str"),
    ("by_names-matches-nothing", lambda w: B.by_names(w.model, {"a": "*", "b": "9.*"}), ValueError,
     r"block 'b': patterns \['9.\*'\] match no trainable parameter"),
    ("by_names-overlap", lambda w: B.by_names(w.model, {"a": "*", "b": "0.*"}), ValueError,
     r"blocks 'a' and 'b' overlap: both match param 0.weight"),
    ("by_names-uncovered", lambda w: B.by_names(w.model, {"a": "0.*"}), ValueError,
     r"params \['2.weight', '2.bias', '4.weight', '4.bias'\] match no block's patterns"),
    ("Blocks-int", lambda w: B.Blocks(5), TypeError, r"Blocks takes a list of \(name, parameters\) pairs, got int"),
    ("Blocks-dict", lambda w: B.Blocks({"a": w.params}), TypeError, r"for a dict name -> parameters use Blocks.of"),
    ("Blocks-str", lambda w: B.Blocks("ab"), TypeError, r"Blocks takes a list of \(name, parameters\) pairs, got str"),
    ("Blocks-name-int", lambda w: B.Blocks([(1, w.params)]), TypeError, r"blocks must map names \(str\) to tensors; "
     r"entry 0"),
    ("Blocks-member-int", lambda w: B.Blocks([("a", [w.params[0], 3])]), TypeError,
     r"block 'a' holds a int, expected tensors"),
    ("Blocks-duplicate-name", lambda w: B.Blocks([("a", w.params[:1]), ("a", w.params[1:])]), ValueError,
     r"block name 'a' appears twice"),
    ("Blocks-same-param-twice", lambda w: B.Blocks([("a", w.params[:2]), ("b", w.params[1:])]), ValueError,
     r"blocks 'a' and 'b' overlap"),
]

PROBE_CASES = [
    ("cross_terms-loss-none", lambda w: pyco.probe.cross_terms(None, w.blocks, w.steps()), TypeError,
     r"loss_fn must be a zero-argument callable returning the loss, got NoneType"),
    ("cross_terms-loss-vector", lambda w: pyco.probe.cross_terms(lambda: w.model(w.x), w.blocks, w.steps()),
     ValueError, r"loss_fn must return a scalar loss, got a tensor of shape \[8, 2\]"),
    ("cross_terms-loss-float", lambda w: pyco.probe.cross_terms(lambda: 1.0, w.blocks, w.steps()), TypeError,
     r"loss_fn must return the loss as a scalar tensor, got float"),
    ("cross_terms-loss-int-tensor", lambda w: pyco.probe.cross_terms(
        lambda: (w.model(w.x).sum() > 0).long(), w.blocks, w.steps()), TypeError,
     r"loss_fn must return a floating-point loss, got torch.int64"),
    ("cross_terms-blocks-int", lambda w: pyco.probe.cross_terms(w.loss_fn, 5, []), TypeError,
     r"blocks must be a pyco.blocks.Blocks"),
    ("cross_terms-no-blocks", lambda w: pyco.probe.cross_terms(w.loss_fn, {}, []), ValueError,
     r"blocks hold no parameters"),
    ("cross_terms-update-short", lambda w: pyco.probe.cross_terms(w.loss_fn, w.blocks, w.steps()[:-1]), ValueError,
     r"update has 5 tensors but the blocks hold 6 parameters"),
    ("cross_terms-update-int", lambda w: pyco.probe.cross_terms(w.loss_fn, w.blocks, 3), TypeError,
     r"update must be a list of tensors aligned with blocks.params\(\) or a dict"),
    ("cross_terms-update-shape", lambda w: pyco.probe.cross_terms(
        w.loss_fn, w.blocks, [*w.steps()[:-1], torch.zeros(3, dtype=torch.float64)]), ValueError,
     r"update for block '4' \(param 4.bias\) has shape \[3\], expected the parameter's \[2\]"),
    ("cross_terms-update-dtype", lambda w: pyco.probe.cross_terms(
        w.loss_fn, w.blocks, [*w.steps()[:-1], torch.zeros(2, dtype=torch.int64)]), TypeError,
     r"update for block '4' \(param 4.bias\): parameter torch.float64 and step torch.int64 must both be real"),
    ("cross_terms-update-meta", lambda w: pyco.probe.cross_terms(
        w.loss_fn, w.blocks, [torch.zeros_like(p, device="meta") for p in w.params]), ValueError,
     r"update for block '0' \(param 0.weight\) is on meta, the parameter on cpu"),
    ("cross_terms-update-nan", lambda w: pyco.probe.cross_terms(
        w.loss_fn, w.blocks, [*w.steps()[:-1], torch.full((2,), NAN, dtype=torch.float64)]), ValueError,
     r"update for block '4' \(param 4.bias\) holds inf or NaN"),
    ("cross_terms-update-not-tensor", lambda w: pyco.probe.cross_terms(w.loss_fn, w.blocks, [0.1] * 6), TypeError,
     r"update for block '0' \(param 0.weight\) is a float, expected a tensor"),
    ("cross_terms-update-dict-missing", lambda w: pyco.probe.cross_terms(
        w.loss_fn, w.blocks, dict(zip(w.params[:-1], w.steps()))), ValueError,
     r"update has no step for block '4' \(param 4.bias\)"),
    ("cross_terms-update-dict-foreign", lambda w: pyco.probe.cross_terms(
        w.loss_fn, w.blocks, {**dict(zip(w.params, w.steps())), w.foreign(): torch.zeros(3)}), ValueError,
     r"update holds a step for a parameter of shape \[3\], which is in no block"),
    ("cross_terms-mode", lambda w: pyco.probe.cross_terms(w.loss_fn, w.blocks, w.steps(), mode="diag"), ValueError,
     r"Invalid mode: 'diag' \(expected one of \('full', 'rows'\)\)"),
    ("cross_terms-dtype", lambda w: pyco.probe.cross_terms(w.loss_fn, w.blocks, w.steps(), dtype=torch.int32),
     ValueError, r"Invalid dtype: torch.int32 \(expected None or a floating-point torch.dtype\)"),
    ("cross_terms-max-batch", lambda w: pyco.probe.cross_terms(w.loss_fn, w.blocks, w.steps(), max_batch=0),
     ValueError, r"Invalid max_batch: 0 \(expected None or an int >= 1\)"),
    ("cross_terms-alone-str", lambda w: pyco.probe.cross_terms(w.loss_fn, w.blocks, w.steps(), alone="no"),
     TypeError, r"Invalid alone: 'no' \(expected True or False\)"),
    ("cross_terms-frozen-param", lambda w: pyco.probe.cross_terms(
        w.loss_fn, {"all": w.params, "x": [torch.zeros(3, dtype=torch.float64)]},
        [*w.steps(), torch.zeros(3, dtype=torch.float64)]), ValueError,
     r"block 'x' \(a parameter of shape \[3\]\) does not require grad"),
    ("cross_terms-process-group", lambda w: pyco.probe.cross_terms(w.loss_fn, w.blocks, w.steps(),
                                                                   process_group=object()), RuntimeError,
     r"process_group was given but torch.distributed is not initialized"),
    ("record-not-optimizer", lambda w: pyco.probe.record(5, w.closure), TypeError,
     r"record: optimizer must be a torch.optim.Optimizer \(or an order wrapping one\), got int"),
    ("record-closure-none", lambda w: pyco.probe.record(w.opt, None), TypeError,
     r"record: closure must be callable .*got NoneType"),
    ("record-blocks-uncovered", lambda w: pyco.probe.record(w.opt, w.closure, {"a": w.params[:2]}), ValueError,
     r"in no block: every parameter needs exactly one block"),
    ("record-process-group", lambda w: pyco.probe.record(w.opt, w.closure, process_group=object()), RuntimeError,
     r"process_group was given but torch.distributed is not initialized"),
]

CASES = OPTIMIZER_CASES + ORDER_CASES + BLOCK_CASES + PROBE_CASES


@pytest.mark.parametrize("case, action, exc, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(case, action, exc, message):
    world = World()
    before = snapshot(world.opt, world.params)
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=message):
        action(world)
    # The two "step-grad" cases swap a gradient through .data themselves: that change is the caller's.
    assert_unchanged(before, world.opt, world.params, grads="step-grad" not in case)
    assert all(p.requires_grad for p in world.params), "a refused call left parameters frozen"
    assert torch.equal(torch.get_rng_state(), rng), "a refused call consumed random numbers"


@pytest.mark.parametrize("make", [
    lambda w: P.Adam([w.params[0], w.params[1], w.params[0]]),
    lambda w: (w.opt.add_param_group({"params": [w.params[0].new_zeros(3)] * 2}), w.opt)[1],
], ids=["constructor", "add_param_group"])
def test_a_parameter_twice_in_a_group_gets_torchs_warning_and_is_kept_once(make):
    """torch.optim warns (UserWarning) and keeps both; pyco warns alike and keeps the first, so that the
    fused kernel moves each tensor once."""
    world = World()
    with pytest.warns(UserWarning, match=r"a parameter group with duplicate parameters.*params 0 and"):
        opt = make(world)
    group = opt.param_groups[-1]["params"]
    assert len({id(p) for p in group}) == len(group)
    for p in group:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in group]
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(group, before))


def test_the_table_covers_every_entry_point():
    """Every public entry point has at least one case (the names below appear in the ids)."""
    ids = " ".join(c[0] for c in CASES)
    for entry in ["SGD", "Adam", "AdamW", "step", "load", "add-group", "GaussSeidel", "ChainGaussSeidel",
                  "BlockCoordinate", "by_names", "Blocks", "cross_terms", "record"]:
        assert entry in ids, entry
    assert len(CASES) >= 100
