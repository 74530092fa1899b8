"""DiLoCo (`--strategy diloco`, in this process): exact against synchronous data parallelism where the maths says
so, replicas that agree bit for bit, a hand-checked weighted outer step, the streaming fragment table, replicas
pipelined over several sites, and clear errors for bad settings."""

import dataclasses
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hxtrain
from helpers import batch, cpu_topology_toml, rel_err
from hxtrain.checkpoints import logical, manifest
from hxtrain.config.topology import Diloco, TopologyError, uniform
from hxtrain.core.optim import OptimizerConfig
from hxtrain.links.codecs import get_codec
from hxtrain.training import diloco as dl
from hxtrain.training import outer as _outer
from models import gpt

T = gpt.TINY.seq_len
SGD = OptimizerConfig(kind="sgd", learning_rate=0.5, warmup_steps=0, clip_norm=0.0, total_steps=50)
ADAMW = OptimizerConfig(warmup_steps=0, total_steps=10)  # no warm-up: the first step already moves the params


def _run(topology, cfg, *, batch_size=8, optimizer=SGD, **kw):  # kw: out, save_every, resume, ...
    return dl.DilocoTrainer(gpt.build(gpt.TINY, seed=0), topology, diloco=cfg, microbatches=2,
                            batch_size=batch_size, optimizer=optimizer, **kw)


def _flat_params(model) -> dict:
    """The plain model's params keyed like a replica's (logical layout), via a one-site pipeline on device 0."""
    return _outer.flat(jax.device_get(logical.to_logical(hxtrain.Pipeline(model, uniform(1), microbatches=1))["params"]))


def test_h1_outer_sgd_lr1_inner_sgd_equals_synchronous_data_parallelism():
    """With H = 1, outer SGD at lr 1 without momentum and inner SGD, DiLoCo over 2 replicas is one SGD step on the
    union batch: loss and params after 3 steps equal the unsplit model's on one device, fp32 rel <= 1e-5."""
    cfg = Diloco(sync_every=1, outer_lr=1.0, outer_momentum=0.0)
    run = _run(uniform(2), cfg)
    model = gpt.build(gpt.TINY, seed=0)
    tx = optax.sgd(SGD.schedule())
    params = nnx.state(model, nnx.Param)
    state = tx.init(params)
    for step in range(3):
        tokens = batch(8, seed=10 + step)
        row = run.train_step(tokens)
        with jax.default_device(jax.devices()[0]):
            loss, grads = nnx.value_and_grad(gpt.loss)(model, jnp.asarray(tokens))
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            nnx.update(model, params)
        assert rel_err(row["loss"], loss) <= 1e-5, (step, row["loss"], float(loss))
    ref = _flat_params(model)
    for rep in run.replicas:
        got = rep.params()
        for k, v in ref.items():
            assert rel_err(got[k], v) <= 1e-5, (rep.name, k, rel_err(got[k], v))
    assert run.outer_steps == 3 and row["replica_tokens"] == {"s0": 3 * 4 * T, "s1": 3 * 4 * T}


def test_replicas_hold_bit_identical_global_params_after_every_outer_step():
    """AdamW inside, Nesterov outside, unequal shares, int8 pseudo-gradients: after each outer step every replica
    holds exactly the global params; between syncs they differ."""
    cfg = Diloco(sync_every=2, shares=(3, 1), codec="int8")
    run = _run(uniform(2), cfg, optimizer=ADAMW)
    for step in range(1, 4):
        row = run.train_step(batch(8, seed=step))
        a, b = (rep.params() for rep in run.replicas)
        same = all(np.array_equal(a[k], b[k]) for k in a)
        assert same == (step % 2 == 0), step
        if step % 2 == 0:
            assert all(np.array_equal(a[k], run.global_params[k]) for k in a)
            # int8: one byte per element plus a float32 scale per row, each replica's delta to the other replica
            assert row["sync_bytes"] == 2 * sum(get_codec("int8").wire_bytes(v.shape, v.dtype)
                                                for v in a.values())
        else:
            assert row["sync_bytes"] == 0
    assert [rep.rows for rep in run.replicas] == [slice(0, 6), slice(6, 8)]
    assert row["replica_tokens"] == {"s0": 3 * 6 * T, "s1": 3 * 2 * T}


def test_the_outer_step_is_the_token_weighted_mean_then_nesterov():
    """OuterSync alone (numpy, no device): unequal token counts weight the decoded deltas; Nesterov on top."""
    rng = np.random.default_rng(0)
    g = {k: rng.standard_normal((3, 5)).astype(np.float32) for k in ("embed/w", "blocks/0/w", "head/w")}
    sync = _outer.OuterSync(Diloco(sync_every=4, outer_lr=0.7, outer_momentum=0.9), g, 2)
    m = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()}
    sync.momentum = {k: v.copy() for k, v in m.items()}
    local = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()} for _ in range(2)]
    sync.add_tokens(0, 300)
    sync.add_tokens(1, 100)  # weights 0.75 / 0.25
    assert sync.due(3) == [] and sync.due(4) == [0] and sync.due(8) == [0]
    deltas = [sync.delta(0, mine)[1] for mine in local]
    new = sync.combine(0, deltas, step=4)
    for k in g:
        avg = 0.75 * (g[k] - local[0][k]) + 0.25 * (g[k] - local[1][k])
        mom = 0.9 * m[k] + avg
        np.testing.assert_allclose(new[k], g[k] - 0.7 * (avg + 0.9 * mom), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sync.momentum[k], mom, rtol=1e-6, atol=1e-6)
    assert sync.since == [[0, 0]] and sync.outer_steps == 1
    assert sync.wire_bytes(0) == sum(4 * v.size for v in g.values())  # codec none: float32
    ready = sync.landed(4)
    assert len(ready) == 1 and all(np.array_equal(sync.global_params[k], new[k]) for k in g)
    mine = dict(local[0])
    sync.apply(mine, ready)
    assert all(np.array_equal(mine[k], new[k]) for k in g)


def test_streaming_fragments_sync_every_parameter_once_per_h_steps():
    """The fragment table is plain data: contiguous groups of about equal bytes covering every key once, and
    staggered offsets that sync each fragment once in every window of H steps."""
    shapes = {f"blocks/{i}/w": ((64, 64 * (1 + i % 3)), "float32") for i in range(12)}
    for fragments in (1, 2, 3, 4):
        groups = _outer.fragment_keys(shapes, fragments)
        assert len(groups) == fragments and [k for g in groups for k in g] == list(shapes)
        sizes = [sum(np.prod(shapes[k][0]) * 4 for k in g) for g in groups]
        assert max(sizes) <= 1.5 * sum(sizes) / fragments
        for H in (fragments, 6, 12):
            offsets = [_outer.sync_offset(f, fragments, H) for f in range(fragments)]
            assert len(set(offsets)) == fragments and max(offsets) == H and min(offsets) >= 1
            for start in range(1, 3 * H):  # every window of H consecutive steps syncs each fragment exactly once
                for d in offsets:
                    assert sum((t - d) % H == 0 and t >= d for t in range(start, start + H)) == (start + H - 1 >= d)
    assert dl.replica_batches(32, (2, 1)) == [21, 11] and dl.replica_batches(8, (1, 1)) == [4, 4]
    # planned shares (speeds) are dealt in whole units of a replica's microbatches x data, largest remainder first
    assert dl.replica_batches(24, (0.76, 0.24), [4, 4]) == [20, 4]
    assert dl.replica_batches(24, (0.55, 0.45), [4, 4]) == [12, 12]
    assert dl.replica_batches(10, (0.5, 0.5), [4, 2]) == [4, 6]
    with pytest.raises(ValueError, match=r"^--batch-size 6: replicas read rows in multiples of \[4, 4\] "
                                         r"\(microbatches x data\), which cannot add up to 6"):
        dl.replica_batches(6, (1, 1), [4, 4])


def test_streaming_run_peaks_at_a_fragment_and_lands_late_results():
    cfg = Diloco(sync_every=4, fragments=2, overlap=1)
    run = _run(uniform(2), cfg, optimizer=ADAMW)
    rows, same = [], []
    for s in range(1, 5):
        rows.append(run.train_step(batch(8, seed=s)))
        a, b = (rep.params() for rep in run.replicas)
        same.append([all(np.array_equal(a[k], b[k]) for k in frag) for frag in run.outer.fragments])
    sent = [r["sync_bytes"] for r in rows]
    assert sent[0] == sent[2] == 0 and sent[1] > 0 and sent[3] > 0  # fragment 0 at step 2, fragment 1 at step 4
    total = 2 * sum(4 * v.size for v in run.global_params.values())  # both replicas' float32 deltas
    assert sent[1] + sent[3] == total and max(sent) < 0.75 * total
    # fragment 0's result lands one step late (step 3): then, and only then, the replicas agree on it
    assert same == [[False, False], [False, False], [True, False], [False, False]]


def test_two_replicas_of_two_pipeline_stages_match_each_replica_unsplit():
    """4 sites as 2 replicas x 2 stages (each pipelined over its own sites and devices) against 2 replicas of one
    site each (the whole model): the same DiLoCo run, fp32 rel <= 1e-5 after an outer step. Inner SGD: AdamW
    would turn the fp32 rounding of near-zero gradients into lr-sized steps, whatever the split."""
    cfg = Diloco(sync_every=2, outer_momentum=0.9)
    opt = SGD
    hybrid = _run(uniform(4), dataclasses.replace(cfg, replicas=(("s0", "s1"), ("s2", "s3"))), optimizer=opt)
    assert [len(r.pipeline.stages) for r in hybrid.replicas] == [2, 2]
    assert [[m.devices.flat[0].id for m in r.pipeline.meshes] for r in hybrid.replicas] == [[0, 1], [2, 3]]
    flat = _run(uniform(2), cfg, optimizer=opt)
    for step in range(1, 3):
        tokens = batch(8, seed=20 + step)
        h, f = hybrid.train_step(tokens), flat.train_step(tokens)
        assert rel_err(h["loss"], f["loss"]) <= 1e-5, step
    for k, v in flat.global_params.items():
        assert rel_err(hybrid.global_params[k], v) <= 1e-5, k


def test_resume_mid_round_is_bit_identical_and_the_checkpoint_exports(tmp_path):
    """Saved at step 2 with a fragment's result still in flight (H 4, 2 fragments, overlap 1); a new trainer on the
    same folder resumes there and its steps 3..6 equal the uninterrupted run's bit for bit. The global params
    export like any run's checkpoint; other settings are refused naming the field."""
    from hxtrain.checkpoints.checkpoint import CheckpointMismatch
    from hxtrain.checkpoints.export import export

    cfg = Diloco(sync_every=4, fragments=2, overlap=1, shares=(3, 1))
    kw = dict(optimizer=ADAMW, max_corpus_bytes=100_000)
    straight = _run(uniform(2), cfg, **kw)
    want = [r["loss"] for r in straight.fit(6, progress=False)]
    first = _run(uniform(2), cfg, out=tmp_path / "run", save_every=2, **kw)
    assert [r["loss"] for r in first.fit(2, progress=False)] == want[:2]
    assert first.outer.pending  # saved with fragment 0's result not yet applied
    again = _run(uniform(2), cfg, out=tmp_path / "run", **kw)
    assert again.resumed_from == 2 and again.step == 2
    assert [r["loss"] for r in again.fit(4, progress=False)] == want[2:]
    for k, v in straight.global_params.items():
        assert np.array_equal(again.global_params[k], v), k
    out = export(tmp_path / "run", tmp_path / "exported")
    assert (out / "params").is_dir()
    with pytest.raises(CheckpointMismatch, match=r"saved with diloco = .*'sync_every': 4.*this run has .*"
                                                 r"'sync_every': 6"):
        _run(uniform(2), dataclasses.replace(cfg, sync_every=6), out=tmp_path / "run", **kw)
    # What a replica process left unsealed when it was lost is set aside when it returns (`--rejoin`) at step 6,
    # in every folder, with the steps from 6 on; the complete ones before stay. Here step 4 of replica 1's folder
    # lost its seal (6: saved at the end)
    from hxtrain.training.diloco_checkpoint import DilocoCheckpoints

    ck = DilocoCheckpoints(again, again.checkpoints.root, keep=5)  # `fit` closed the trainer's own
    ck.save(4, force=True)
    ck.close()
    assert ck.complete() == [2, 4, 6]
    (ck.reps[1].directory / "4" / manifest.MANIFEST).unlink()
    ck.set_aside_for_return(6)
    assert ck.complete() == [2] and [c.all_steps() for c in (ck.glob, *ck.reps)] == [[2]] * 3
    for c in (ck.glob, *ck.reps):
        assert sorted(p.name.split("-")[0] for p in (c.directory / "rejected").iterdir()) == ["4", "6"]


class _SlowSecondReplica:
    """A clock for `DilocoTrainer.clock` under which replica 1's inner step takes `ratio` times as long per row as
    replica 0's: it is read before and after each replica's step, in replica order."""

    def __init__(self, run, ratio: float):
        self.run, self.ratio, self.calls, self.now = run, ratio, 0, 0.0

    def __call__(self) -> float:
        r, end = divmod(self.calls % 4, 2)
        self.calls += 1
        if end:
            rep = self.run.replicas[r]
            self.now += (rep.rows.stop - rep.rows.start) * 1e-3 * (self.ratio if r else 1.0)
        return self.now


def test_measured_shares_deal_the_rows_by_each_replicas_rows_per_second(tmp_path):
    """shares = "measured": equal until the first outer step, then the global batch is dealt in proportion to the
    rows per second each replica's inner steps ran at (in whole units of microbatches x data); the rows of each
    step are in its metrics, the token-weighted average follows them, and a resume takes the dealt rows from the
    checkpoint (they came from timings, so they are not recomputed)."""
    cfg = Diloco(sync_every=2, shares="measured")
    kw = dict(optimizer=ADAMW, max_corpus_bytes=100_000, batch_size=16)
    run = _run(uniform(2), cfg, out=tmp_path / "run", save_every=3, **kw)
    run.clock = _SlowSecondReplica(run, 3.0)
    assert "shares measured (equal until the first outer step" in run.describe()
    rows = run.fit(5, progress=False)
    assert [tuple(r["replica_rows"].values()) for r in rows] == [(8, 8), (8, 8), (12, 4), (12, 4), (12, 4)]
    assert [r["replica_tokens"]["s1"] for r in rows][-1] == (8 + 8 + 4 + 4 + 4) * T
    assert all(np.isfinite(r["loss"]) for r in rows)
    # step 6 with replica 1 as fast per row as replica 0: since the deal at step 4 its median is 2 ms per row (3, 1),
    # so 2:1 -> 10 / 6 rows; that would not shorten the slowest step (12 ms either way), so the rows stay
    run.clock = _SlowSecondReplica(run, 1.0)
    assert run.train_step(next(run.batches))["replica_rows"] == {"s0": 12, "s1": 4}
    assert [r.rows for r in run.replicas] == [slice(0, 12), slice(12, 16)]
    again = _run(uniform(2), cfg, out=tmp_path / "run", **kw)  # the end of fit saved step 5, with rows 12 / 4
    assert again.resumed_from == 5 and [r.rows for r in again.replicas] == [slice(0, 12), slice(12, 16)]
    assert again.tokens == [(8 + 8 + 12 * 3) * T, (8 + 8 + 4 * 3) * T]
    meter = dl.ShareMeter(16, [2, 2], 2)
    assert meter.deal([8, 8], [1e-3, 3e-3]) == [12, 4]  # by rows per second
    assert meter.deal([12, 4], [1e-3, 2e-3]) == [12, 4]  # 10 / 6 would not shorten the slowest step by 5%
    assert meter.deal([12, 4], [1e-3, 1e-3]) == [8, 8]  # 12 ms -> 8 ms
    assert meter.deal([12, 4], [1e-3, 0.0]) == [12, 4]  # a replica that measured nothing keeps the rows
    meter.add(0, 4, 4e-3), meter.add(0, 4, 40e-3), meter.add(0, 4, 5e-3)  # one step compiled: the median
    assert meter.per_row(0) == pytest.approx(1.25e-3)
    with pytest.raises(ValueError, match=r"^--batch-size 6: replicas read rows in multiples of \[4, 4\]"):
        dl.ShareMeter(6, [4, 4], 2).deal([2, 4], [1.0, 1.0])


def test_the_held_out_loss_is_the_global_params_and_leaves_replica_0_as_it_was():
    run = _run(uniform(2), Diloco(sync_every=2), optimizer=ADAMW, eval_batches=2, max_corpus_bytes=100_000)
    rows = run.fit(3, progress=False, eval_every=2)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 3]  # every 2nd step and the last
    # the reference: the plain model holding the global params, on one device
    pipe = hxtrain.Pipeline(gpt.build(gpt.TINY, seed=0), uniform(1), microbatches=1)
    pipe.set_params(logical.to_stages(pipe, _outer.nested(run.global_params), [s.params for s in pipe.stages]))
    plain = pipe.trained_model()
    want = np.mean([float(gpt.loss(plain, jnp.asarray(b))) for b in run.eval_set])
    assert len(run.eval_set) == 2 and run.eval_set[0].shape == (4, T + 1)  # replica 0's rows
    assert rel_err(rows[-1]["eval_loss"], want) <= 1e-5, (rows[-1]["eval_loss"], want)
    before = run.replicas[0].params()  # step 3 is an inner step after the sync: not the global params
    assert any(not np.array_equal(v, run.global_params[k]) for k, v in before.items())
    assert rel_err(run.evaluate(), want) <= 1e-5
    for k, v in run.replicas[0].params().items():  # its own params are back
        assert np.array_equal(v, before[k]), k
    with pytest.raises(ValueError, match=r"^eval_every: this DilocoTrainer holds no data out"):
        _run(uniform(2), Diloco(sync_every=2)).fit(1, progress=False, eval_every=1)


def test_planned_shares_follow_the_tokens_per_s_the_planner_predicts_for_each_replica():
    import math

    from hxtrain.planning.planner import plan

    base = uniform(2)  # s0 has two devices (data 2), s1 one: the planner expects s0 to be about twice as fast
    topo = dataclasses.replace(base, sites=(dataclasses.replace(base.sites[0], devices=2, data=2), base.sites[1]))
    run = _run(topo, Diloco(sync_every=2, shares="planned"), batch_size=12)
    rates = [plan(topo.only([s.name], "replicas"), gpt.TINY, global_batch=12, time_budget_s=math.inf)
             .predicted.tokens_per_s for s in topo.sites]
    rows = [r.rows.stop - r.rows.start for r in run.replicas]
    assert rows == dl.replica_batches(12, rates) == [8, 4]
    assert re.search(r"shares planned \(s0 [\d,]+ tokens/s, s1 [\d,]+ tokens/s\)", run.describe())
    assert np.isfinite(run.train_step(batch(12))["loss"])
    given = _run(topo, Diloco(sync_every=2, shares=(1, 2)), batch_size=12)  # explicit shares are kept
    assert [r.rows.stop - r.rows.start for r in given.replicas] == [4, 8] and "shares given" in given.describe()


def test_shares_planned_from_a_measured_profile_follow_the_measured_speeds(tmp_path):
    """`shares = "planned:FILE"`: the planner's tokens/s per replica from the block times `hxtrain profile`
    measured (here site s1's blocks take 3x as long as s0's, on equal devices), so the faster replica reads more
    rows; a profile that cannot be read is refused naming the setting."""
    import math

    from hxtrain.planning.planner import plan
    from hxtrain.planning.profile import StageTimes, load_site_profiles, write_profile

    topo = uniform(2)
    seq = gpt.TINY.seq_len
    times = [StageTimes(site=name, backend="cpu", data=1, tensor=1, microbatch=6, seq=seq, fwd_block=f,
                        bwd_block=2 * f, fwd_fixed=0.0, bwd_fixed=0.0, embed_fwd=1e-4, embed_bwd=1e-4, head=1e-3,
                        repeats=5) for name, f in (("s0", 1e-3), ("s1", 3e-3))]
    path = write_profile(tmp_path / "prof.toml", times, model="tiny", topology=topo.name)
    run = _run(topo, Diloco(sync_every=2, shares=f"planned:{path}"), batch_size=16)
    profiles = load_site_profiles(path, topo)
    rates = [plan(topo.only([s.name], "replicas"), gpt.TINY, global_batch=16, time_budget_s=math.inf,
                  profiles={s.name: profiles[s.name]}).predicted.tokens_per_s for s in topo.sites]
    rows = [r.rows.stop - r.rows.start for r in run.replicas]
    assert rows == dl.replica_batches(16, rates) and rows[0] > rows[1], (rows, rates)
    assert f"shares planned from the block times measured in {path} (s0 " in run.describe()
    with pytest.raises(ValueError, match=r"--shares planned:/nonexistent.toml: cannot read the profile"):
        _run(topo, Diloco(sync_every=2, shares="planned:/nonexistent.toml"), batch_size=16)


def test_bad_diloco_settings_are_refused_naming_the_field(tmp_path):
    topo = hxtrain.load_topology("local-4site")
    cases = [
        (Diloco(sync_every=0), "diloco.sync_every: expected a whole number of inner steps >= 1, got 0"),
        (Diloco(codec="int4"), "diloco.codec: unknown codec 'int4' \\(did you mean 'int8'\\?\\)"),
        (Diloco(replicas=(("s0", "s1"), ("s2",))), "diloco.replicas: the groups must cover every site exactly once "
                                                   "\\(s0, s1, s2, s3\\); site 's3' is in no replica"),
        (Diloco(replicas=(("s0", "s1"), ("s1", "s2", "s3"))), "site 's1' is in two replicas"),
        (Diloco(replicas=(("s1", "s0"), ("s2", "s3"))), "lists its sites out of pipeline order"),
        (Diloco(replicas=(("s0", "s1", "s2", "s3"),)), "diloco.replicas: expected at least 2 replicas"),
        (Diloco(fragments=5, sync_every=4), "diloco.fragments: expected a whole number in 1..sync_every \\(4\\)"),
        (Diloco(shares=(1, 2)), "diloco.shares: expected 4 numbers > 0 \\(one per replica\\)"),
        (Diloco(shares="fast"), "diloco.shares: expected 4 numbers > 0 \\(one per replica\\), \"planned\", "
                                 "\"planned:FILE\" or \"measured\", got "),
        (Diloco(outer_momentum=1.0), "diloco.outer_momentum: expected a number in \\[0, 1\\)"),
    ]
    for cfg, message in cases:
        with pytest.raises(TopologyError, match=message):
            dataclasses.replace(topo, diloco=cfg)
    mesh = tmp_path / "m.toml"
    mesh.write_text(open(topo.source).read() + '\n[diloco]\nsync_every = 10\nreplica = [["s0"]]\n')
    with pytest.raises(TopologyError, match=r"diloco.replica: unknown key \(did you mean 'replicas'\?\)"):
        hxtrain.load_topology(mesh)
    deep = uniform(2, layers=None)
    with pytest.raises(ValueError, match=r"replica s0: its share of --batch-size 6 is 3 rows: .*microbatch"):
        dl.DilocoTrainer(gpt.build(gpt.TINY, seed=0), deep, diloco=Diloco(), microbatches=2, batch_size=6)


def test_the_command_line_names_the_flag(capsys):
    from hxtrain import cli

    assert cli.main(["train", "--strategy", "diloco", "--mesh", "local-4site", "--sync-every", "0"]) == 2
    assert "hxtrain train: error: --sync-every: expected a whole number of inner steps >= 1, got 0" in \
        capsys.readouterr().err
    assert cli.main(["train", "--strategy", "diloco", "--replicas", "s0+s1,s2", "--mesh", "local-4site"]) == 2
    assert "error: --replicas: the groups must cover every site exactly once" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: the usage line, then the error
        cli.main(["train", "--strategy", "diloco", "--shares", "fast"])
    assert "argument --shares: expected one number per replica like 2,1, planned, planned:FILE or measured, got 'fast'" in \
        capsys.readouterr().err
    assert cli.main(["train", "--strategy", "diloco", "--executor", "spmd"]) == 2
    assert "error: --strategy diloco: --executor spmd is not supported with diloco yet" in capsys.readouterr().err


_TWO_SITES = cpu_topology_toml("two", "ab", ["ab"], dict(model="tiny", schedule="1f1b", microbatches=2, batch_size=8,
                                                            steps=3), dict(sync_every=2, shares=[3, 1], codec="int8"))


def test_two_replicas_as_site_processes_match_the_in_process_run(tmp_path):
    """`hxtrain launch --strategy diloco`: each site a replica over the run's TLS link; per-replica losses equal
    the in-process DilocoTrainer's (which the tests above check against synchronous DP), step for step."""
    import json
    import subprocess
    import sys

    mesh = tmp_path / "two.toml"
    mesh.write_text(_TWO_SITES)
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--strategy", "diloco",
                            "--sync-every", "1", "--out", str(out), "--timeout", "60", "--eval-every", "2",
                            "--eval-batches", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    topo = hxtrain.load_topology(mesh)  # meanwhile, the same run in this process
    ref = dl.DilocoTrainer(gpt.build(gpt.TINY, seed=0), topo, diloco=dataclasses.replace(topo.diloco, sync_every=1),
                           microbatches=2, batch_size=8, optimizer=OptimizerConfig.for_steps(3, 3e-3), eval_batches=1)
    ref_rows = ref.fit(3, progress=False, eval_every=2)
    try:
        stdout, _ = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 0, stdout[-6000:]
    assert "diloco replica 0 of 2, rows 0..5 of each batch (shares given), sync every 1 steps, codec int8" in stdout
    want = [r["replica_loss"] for r in ref_rows]
    for s in ("a", "b"):
        rows = [json.loads(line) for line in (out / f"metrics-{s}.jsonl").read_text().splitlines()]
        assert [r["outer_step"] for r in rows] == [1, 2, 3] and all(r["sync_bytes"] > 0 for r in rows)
        for got, w in zip(rows, want):
            assert rel_err(got["loss"], w[s]) <= 1e-5, (s, got["loss"], w[s])
        # the global params' held-out loss at steps 2 and 3, taken by replica 0 (site a) as in one process
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        want_evals = [(r["step"], r["eval_loss"]) for r in ref_rows if "eval_loss" in r] if s == "a" else []
        assert [k for k, _ in evals] == [k for k, _ in want_evals], (s, evals)
        assert all(rel_err(g, w) <= 1e-5 for (_, g), (_, w) in zip(evals, want_evals)), (evals, want_evals)


def test_replica_processes_deal_measured_shares_the_same(tmp_path):
    """`--shares measured` as site processes: at every outer step the two replicas send each other their rows
    and seconds of inner step and both deal the same rows (in whole units of microbatches x data) for the next
    round, whatever the timings say."""
    import json
    import subprocess
    import sys

    mesh = tmp_path / "two.toml"
    mesh.write_text(_TWO_SITES)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--strategy", "diloco",
                          "--shares", "measured", "--sync-every", "2", "--steps", "5", "--out", str(out),
                          "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:]
    assert "rows 0..3 of each batch (shares measured (equal until the first outer step" in run.stdout
    dealt = {}
    for s in ("a", "b"):
        found = re.findall(rf"\[{s}\] site '{s}': step (\d): rows per second of inner step \S+ \S+ -> rows "
                           r"\[(\d+), (\d+)\] from step", run.stdout)
        dealt[s] = [(int(k), int(x), int(y)) for k, x, y in found]
    assert [k for k, _, _ in dealt["a"]] == [2, 4] and dealt["a"] == dealt["b"], dealt
    assert all(x + y == 8 and x % 2 == 0 and y % 2 == 0 and x > 0 and y > 0 for _, x, y in dealt["a"])
    rows = {s: [json.loads(line) for line in (out / f"metrics-{s}.jsonl").read_text().splitlines()]
            for s in ("a", "b")}
    for step in range(1, 6):  # the rows each replica read, step by step, add up to the global batch
        a, b = rows["a"][step - 1]["replica_rows"], rows["b"][step - 1]["replica_rows"]
        want = (4, 4) if step <= 2 else next(((x, y) for k, x, y in reversed(dealt["a"]) if k < step))
        assert (a, b) == want, (step, a, b, dealt)


def test_replica_processes_checkpoint_and_a_relaunch_resumes_exactly(tmp_path):
    """`hxtrain launch --strategy diloco --checkpoint-dir D`: a run stopped after step 2 (`--stop-at`, the schedule
    still spans 4 steps) and launched again resumes from the step both replicas sealed; steps 3 and 4 equal the
    in-process run's, and both replicas' folders hold the same global params."""
    import json
    import subprocess
    import sys

    from hxtrain.checkpoints.checkpoint import Checkpoints

    mesh = tmp_path / "two.toml"
    mesh.write_text(_TWO_SITES)
    ckpt = tmp_path / "ckpt"

    def launch(*extra):
        return subprocess.Popen([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--strategy",
                                 "diloco", "--steps", "4", "--checkpoint-dir", str(ckpt), "--timeout", "60", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = launch("--stop-at", "2", "--save-every", "2", "--out", str(tmp_path / "one"))
    topo = hxtrain.load_topology(mesh)  # meanwhile, the whole run in this process
    ref = dl.DilocoTrainer(gpt.build(gpt.TINY, seed=0), topo, microbatches=2, batch_size=8,
                           optimizer=OptimizerConfig.for_steps(4, 3e-3))
    want = [r["replica_loss"] for r in ref.fit(4, progress=False)]
    outs = {}
    try:
        outs["one"] = first.communicate(timeout=300)[0]
        assert first.returncode == 0, outs["one"][-6000:]
        second = launch("--resume", "must", "--out", str(tmp_path / "two"))
        outs["two"] = second.communicate(timeout=300)[0]
    finally:
        first.kill()
        if "second" in locals():
            second.kill()
    assert second.returncode == 0, outs["two"][-6000:]
    for s in ("a", "b"):
        assert f"site {s!r}: resumed from step 2" in outs["two"], outs["two"][-4000:]
        for run, steps in (("one", [1, 2]), ("two", [3, 4])):
            rows = [json.loads(x) for x in (tmp_path / run / f"metrics-{s}.jsonl").read_text().splitlines()]
            assert [r["step"] for r in rows] == steps
            for r in rows:
                assert rel_err(r["loss"], want[r["step"] - 1][s]) <= 1e-5, (s, r["step"], r["loss"])
    # the global params of step 4, in both replicas' folders: bit-identical, and the in-process run's
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    like = _outer.nested({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu)
                          for k, v in ref.outer.global_params.items()})
    got = {}
    for s in ("a", "b"):
        ck = Checkpoints(ckpt / s)
        assert ck.steps() == [2, 4], (s, ck.steps())
        got[s] = _outer.flat(jax.tree.map(np.asarray, ck.read_item(4, "params", like)))
    assert got["a"].keys() == ref.outer.global_params.keys()
    for k, want_k in ref.outer.global_params.items():
        np.testing.assert_array_equal(got["a"][k], got["b"][k])
        assert rel_err(got["a"][k], want_k) <= 1e-5, k


def test_elastic_replica_goes_on_alone_when_the_other_is_killed(tmp_path):
    """`hxtrain launch --strategy diloco --elastic`: site b is killed mid-run; site a drops it from the average,
    finishes every step alone, and the launcher exits 0 naming the lost site. Without --strategy diloco,
    --elastic is refused in one line."""
    import json
    import signal
    import sys

    from tests.test_multiprocess import _Run

    mesh = tmp_path / "two.toml"
    mesh.write_text(_TWO_SITES)
    out = tmp_path / "out"
    run = _Run([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--strategy", "diloco", "--elastic",
                "--sync-every", "2", "--steps", "8", "--out", str(out), "--timeout", "5", "--grace", "5",
                "--no-rejoin"])
    pid = int(run.wait_for(r"\[launch\] site 'b': pid (\d+)", 60).split("pid ")[1].split(",")[0])
    run.wait_for(r"\[a\] step 2 ", 240)
    os.kill(pid, signal.SIGKILL)
    assert run.finish(120) == 0, run.text()
    text = run.text()
    assert re.search(r"\[a\] site 'a': lost replica 'b' at step \d+ \(.*\); continuing as the only replica", text)
    assert "[launch] elastic: site 'b' was killed by SIGKILL (from outside); the run finished on 'a'" in text
    rows = [json.loads(line) for line in (out / "metrics-a.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["outer_step"] == 4
    assert all(np.isfinite(r["loss"]) for r in rows)
    digests = re.findall(r"\[a\] site 'a': global params after outer step 4: sha256 (\w+)", text)
    assert len(digests) == 1
    for flags, message in ((["--elastic"], "--elastic: a pipeline site does not re-plan by itself; `hxtrain launch "
                                          "--elastic` does (a site continues on the survivors with --sites, "
                                          "--partition and --continue-step)"),
                           (["--strategy", "diloco", "--rejoin"], "--rejoin: only a DiLoCo replica of an elastic run "
                            "returns by itself (--strategy diloco --elastic); a pipeline site comes back through "
                            "`hxtrain launch --elastic`")):
        bad = subprocess.run([sys.executable, "-m", "hxtrain", "site", "--mesh", str(mesh), "--site", "a", *flags,
                              "--insecure-plaintext"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "HXTRAIN_SECRET": "0123456789abcdef" * 2})
        assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == f"hxtrain site 'a': error: {message}"


def test_a_killed_replica_is_started_again_and_takes_the_global_params(tmp_path):
    """`hxtrain launch --strategy diloco --elastic --checkpoint-dir D` (rejoin is the default): b is killed, a goes
    on alone, the launcher starts b again with --rejoin, and at a's next sync b takes the global params and outer
    state; both finish every step and end with bit-identical global params. Both save every 50 steps, b again
    after it is back; a relaunch from the newest step both saved before the end ends with the same params."""
    import json
    import shutil
    import signal
    import sys

    from hxtrain.checkpoints.checkpoint import Checkpoints
    from tests.test_multiprocess import _Run

    mesh = tmp_path / "two.toml"
    mesh.write_text(_TWO_SITES)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    steps = 300  # b is back by step ~50 here (killed at ~5): time enough, and saves both hold before the end

    def launch(*extra):
        return _Run([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--strategy", "diloco",
                     "--sync-every", "3", "--steps", str(steps), "--timeout", "5", "--checkpoint-dir", str(ckpt),
                     "--save-every", "50", "--keep", "12", *extra])

    run = launch("--elastic", "--out", str(out), "--grace", "30")
    pid = int(run.wait_for(r"\[launch\] site 'b': pid (\d+)", 60).split("pid ")[1].split(",")[0])
    run.wait_for(r"\[a\] step 4 ", 240)
    os.kill(pid, signal.SIGKILL)
    assert run.finish(300) == 0, run.text()
    text = run.text()
    lost = int(re.search(r"\[a\] site 'a': lost replica 'b' at step (\d+)", text)[1])
    assert re.search(r"\[launch\] elastic: site 'b' exited with code -9; starting it again to rejoin the run", text)
    back = int(re.search(r"\[a\] site 'a': replica 'b' rejoined at step (\d+); it holds the global params of "
                         r"outer step (\d+)", text)[1])
    assert lost < back < steps and back % 3 == 0, text  # at one of a's syncs
    assert re.search(rf"\[b\] site 'b': rejoined at step {back} with the global params of outer step {back // 3}",
                     text)
    digests = re.findall(rf"\[(\w)\] site '\w': global params after outer step {steps // 3}: sha256 (\w+)", text)
    assert sorted(s for s, _ in digests) == ["a", "b"] and digests[0][1] == digests[1][1], digests
    assert "[launch] all 2 sites finished" in text
    rows = [json.loads(line) for line in (out / "metrics-b.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-(steps - back):] == list(range(back + 1, steps + 1))  # b's steps after it
    assert all(np.isfinite(r["loss"]) for r in rows)
    # a saved every 50 steps; b those before it was killed (none: killed at step 4) and those after it was back
    saved = {s: Checkpoints(ckpt / s).steps() for s in "ab"}
    assert saved["a"] == list(range(50, steps + 1, 50)), saved
    assert saved["b"] == [x for x in range(50, steps + 1, 50) if x > back], (back, saved)
    both = [x for x in saved["b"] if x < steps]
    assert both, f"b rejoined at step {back}: too late for a save step both replicas hold before the end"
    for s in "ab":  # the run stopped at the newest step both saved before the end: relaunched, it ends the same
        for x in saved[s]:
            if x > both[-1]:
                shutil.rmtree(ckpt / s / str(x))
    again = launch("--resume", "must", "--out", str(tmp_path / "again"))
    assert again.finish(300) == 0, again.text()
    assert f"site 'b': resumed from step {both[-1]}" in again.text()
    redone = re.findall(rf"\[(\w)\] site '\w': global params after outer step {steps // 3}: sha256 (\w+)",
                        again.text())
    assert sorted(redone) == sorted(digests), (redone, digests)


def test_a_returning_replica_restarts_its_inner_optimizer_at_the_runs_step():
    """Its moments are gone, but optax's step counters read the run's step, so its learning rate is the run's
    (at step 0 the warm-up's would be 0 and the first update would not move the params)."""
    import types

    from hxtrain.core.optim import SiteOptimizer

    def first_update_moves(restart_at):
        stage = types.SimpleNamespace(params={"w": jnp.ones((2, 2))})
        opt = SiteOptimizer(OptimizerConfig(warmup_steps=10, total_steps=100), [stage])
        if restart_at is not None:
            opt.restart_at(restart_at)
            counts = [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(opt.states[0])
                      if jax.tree_util.keystr(path).endswith("count")]
            assert counts and set(counts) == {restart_at}
        new, _ = opt.apply({"w": jnp.ones((2, 2))}, opt.states[0], {"w": jnp.full((2, 2), 0.5)}, jnp.float32(1.0))
        return not np.array_equal(np.asarray(new["w"]), np.ones((2, 2)))

    assert not first_update_moves(None) and first_update_moves(37)
