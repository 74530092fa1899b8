"""Child process of tests/test_two_clients.py: runs with site b on a second PJRT client (XLA's CPU plugin).

A plugin must be registered before JAX initialises its backends, which the pytest process has already done, so
every check that needs the plugin runs here. `python _two_client_child.py MODE OUT` writes what the test asserts
on to OUT as JSON. Modes:
  inprocess  1F1B / GPipe / ZB-H1 against the one-device reference, the clients and bytes, the SPMD refusal, and
             checkpoints across clients (2 clients -> all built-in, -> one device, -> export; built-in -> 2 clients)
  placement  the placement checks and their messages, and a site served by a `jax_plugins` package
  late       JAX initialised before the plugin was registered
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# The suite's XLA flags (optimisation level 0: compiling is most of this child's time) and 8 host devices
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def _jax_plugins_package() -> None:
    """An installed-style `jax_plugins` namespace package serving backend "ascend" (the CPU plugin stands in): JAX
    discovers it and calls its initialize() when it starts, as it does for jax-cuda12-plugin."""
    root = Path(tempfile.mkdtemp()) / "jax_plugins" / "xla_ascend_standin"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text(
        "def initialize():\n"
        "    import fastatomstruct_xla_cpu\n"
        "    from jax._src import xla_bridge\n"
        "    xla_bridge.register_plugin('ascend', library_path=fastatomstruct_xla_cpu.library_path(), priority=-1,\n"
        "                               options={'cpu_device_count': 2})\n")
    sys.path.insert(0, str(root.parent.parent))


if sys.argv[1] == "placement":  # JAX looks for jax_plugins packages when it is imported
    _jax_plugins_package()

import hxtrain  # noqa: E402  (after XLA_FLAGS)
from hxtrain import backends  # noqa: E402

MODE, OUT = sys.argv[1], Path(sys.argv[2])
TOPO = hxtrain.load_topology("local-2client")
PLUGIN = "fastatomstruct_xla_cpu"
KW = dict(microbatches=2, batch_size=8, max_corpus_bytes=200_000)  # microbatch 4, as in the equivalence runs


def error_of(fn) -> str:
    try:
        fn()
    except Exception as e:  # the message is what the test matches
        return f"{type(e).__name__}: {e}"
    return "no error"


def client_of(stage):
    return stage.role.mesh.devices.flat[0].client


def inprocess() -> dict:
    hxtrain.register_plugins(TOPO)  # before any array: the model below starts JAX's backends
    import jax

    import helpers
    from hxtrain.checkpoints.export import export, load_params
    from hxtrain.core.optim import OptimizerConfig
    from models import gpt

    out: dict = {"schedules": {}}
    ref_loss, ref_grads = helpers.reference(16)
    for name in ("1f1b", "gpipe", "zb-h1"):
        pipe = hxtrain.Pipeline(helpers.model(), TOPO, schedule=name, microbatches=4)
        loss, grads = pipe.loss_and_grads(helpers.batch(16))
        try:
            helpers.assert_trees_close(grads, ref_grads)
            worst = "ok"
        except AssertionError as e:
            worst = str(e)
        a, b = (client_of(s) for s in pipe.stages)
        out["schedules"][name] = dict(
            loss_rel=helpers.rel_err(loss, ref_loss), grads=worst, bytes=pipe.transport.total_bytes(),
            per_kind={k[2]: v.bytes for k, v in pipe.transport.stats.items()},
            same_client=a is b, a_is_builtin=a is jax.devices("cpu")[0].client,
            b_is_plugin=b is jax.devices(PLUGIN)[0].client,
            platforms=[a.platform, b.platform],
            ids=[[d.id for d in s.role.mesh.devices.flat] for s in pipe.stages])
    cfg = helpers.model().cfg
    out["analytic_bytes"] = 2 * 1 * 4 * 4 * cfg.seq_len * cfg.d_model * 4  # 2(S-1) M mb T D fp32
    out["spmd"] = error_of(lambda: hxtrain.SpmdPipeline(helpers.model(), TOPO, microbatches=4))
    out["describe"] = hxtrain.Pipeline(helpers.model(), TOPO, microbatches=4).describe()

    tmp = Path(tempfile.mkdtemp())
    fixed = helpers.batch(8, seed=7)

    def run(topology, folder, steps, resume="auto"):
        t = hxtrain.Trainer(gpt.build(gpt.TINY, seed=0), topology, out=folder, resume=resume, **KW)
        return t, [r["loss"] for r in t.fit(steps, progress=False)]  # saves at the end of fit

    def continued(source, topology):
        """Steps 3-4 on `topology` from the step-2 checkpoint copied from `source`."""
        folder = tmp / f"{source.name}-on-{topology if isinstance(topology, str) else topology.name}"
        shutil.copytree(source, folder)
        t, losses = run(topology, folder, 2, resume="must")
        return {"resumed_from": t.resumed_from, "losses": losses}

    for name, topology in (("two", TOPO), ("builtin", "local")):
        trainer, first = run(topology, tmp / name, 2)
        shutil.copytree(tmp / name, tmp / f"{name}-at-2")
        later = [r["loss"] for r in trainer.fit(2, progress=False)]  # the same trainer on: uninterrupted
        out[name] = {"first": first, "later": later, "fixed_loss": float(trainer.pipeline.grads(fixed)[0])}
    out["two_to_builtin"] = continued(tmp / "two-at-2", "local")
    out["two_to_one_device"] = continued(tmp / "two-at-2", hxtrain.uniform(1))
    out["builtin_to_two"] = continued(tmp / "builtin-at-2", TOPO)
    export(tmp / "two", tmp / "export")
    one = hxtrain.Pipeline(gpt.build(gpt.TINY, seed=5), hxtrain.uniform(1), microbatches=2)
    load_params(one, tmp / "export")
    out["export_fixed_loss"] = float(one.grads(fixed)[0])
    out["export_on_builtin"] = client_of(one.stages[0]) is jax.devices("cpu")[0].client
    # what `hxtrain launch --mesh local-2client` must reproduce (the optimizer `hxtrain site` derives)
    site_run = hxtrain.Trainer(gpt.build(gpt.TINY, seed=0), TOPO, microbatches=2, batch_size=8,
                               optimizer=OptimizerConfig.for_steps(3))  # the corpus a site process reads
    out["site_reference"] = [{k: r[k] for k in ("step", "loss", "grad_norm")} for r in site_run.fit(3, progress=False)]
    return out


def placement() -> dict:
    import dataclasses

    import fastatomstruct_xla_cpu

    a, b = TOPO.sites
    ascend = hxtrain.Site("e", "ascend", 2, 2, 1)
    place = backends.place_sites
    lib = fastatomstruct_xla_cpu.library_path()
    by_path = dataclasses.replace(b, name="c", backend=f"plugin:{lib}", plugin=None, plugin_options=None)
    placed = place([a, b, by_path, ascend])
    clients = [devs[0].client for devs in placed]
    return dict(
        names=[backends.site_client(s).name for s in (a, b, by_path, ascend)],
        ascend_source=backends.site_client(ascend).source.how,
        ids=[[d.id for d in devs] for devs in placed],
        platforms=[c.platform for c in clients],
        distinct_clients=len({id(c) for c in clients}),
        too_few=error_of(lambda: place([a, dataclasses.replace(b, devices=8, data=4)])),
        past_the_end=error_of(lambda: place([a, b, dataclasses.replace(b, name="d", first_device=2, devices=2,
                                                                       data=1)])),
        overlap=error_of(lambda: place([a, dataclasses.replace(a, name="a2", first_device=2)])),
        shared=[[d.id for d in devs] for devs in place(
            [dataclasses.replace(a, share_devices=True),
             dataclasses.replace(a, name="a2", first_device=0, share_devices=True)])],
        builtin_after_builtin=[[d.id for d in devs] for devs in place([a, dataclasses.replace(a, name="a2")])],
        missing_library=error_of(lambda: place([a, dataclasses.replace(b, plugin=str(HERE / "missing.so"))])),
        options_disagree=error_of(lambda: place([b, dataclasses.replace(b, name="b2",
                                                                        plugin_options={"cpu_device_count": 8})])),
    )


def late() -> dict:
    import jax

    jax.devices()  # a notebook that computed something before registering
    from models import gpt

    return {"late": error_of(lambda: hxtrain.Pipeline(gpt.build(gpt.TINY), TOPO, microbatches=2))}


if __name__ == "__main__":
    OUT.write_text(json.dumps({"inprocess": inprocess, "placement": placement, "late": late}[MODE]()))
