"""Which replica a DiLoCo site process belongs to and what it links to, checked before anything starts, and its
`LocalSite` (`hxtrain.sites.diloco` runs it).

Two replicas, each a site or a group of as many sites that pipeline the model among themselves (the topology's
`[diloco] replicas`); site j of one replica holds the same stages as site j of the other (both split the model
alike), and the two exchange those stages' pseudo-gradients over a link between them.
"""

from __future__ import annotations

import dataclasses

from hxtrain.data import loader as _data


def check(topology, cfg, error) -> object:
    """The run's `Diloco` for a site process; `error(message)` (the site's SiteError) for what it cannot run."""
    from hxtrain.training.diloco_run import resolve_diloco

    try:
        d = resolve_diloco(topology, cfg)
    except ValueError as e:
        raise error(str(e)) from None
    groups = d.groups(topology)
    shown = ['+'.join(g) for g in groups]
    if len(groups) != 2 or len(groups[0]) != len(groups[1]):
        raise error(f"--strategy diloco in site processes: two replicas of as many sites each for now (site j of "
                    f"one syncs with site j of the other), got {shown}; run it in one process (hxtrain train "
                    "--strategy diloco)")
    if len(groups[0]) > 1:  # replica groups that pipeline the model: what is not built for them yet, said now
        if cfg.elastic:
            raise error(f"--strategy diloco with replica groups {shown} in site processes: --elastic is not built "
                        "for groups yet; leave it out, or run in one process (hxtrain train)")
        for a, b in zip(*groups):
            if not any(set(ln.sites) == {a, b} for ln in topology.links):
                raise error(f"--strategy diloco with replica groups {shown}: sites {a!r} and {b!r} hold the same "
                            f"stages of the two replicas and exchange their pseudo-gradients, but the topology has "
                            f"no link between them; add [[links]] between = [\"{a}\", \"{b}\"]")
    try:
        _sizes(topology, d, cfg)  # before anything starts: shares that leave a replica no rows, a plan that fails
    except ValueError as e:
        raise error(str(e)) from None
    return d


def place(topology, d, index: int) -> tuple[int, int]:
    """(the replica of site `index`, its position in that replica's pipeline)."""
    name = topology.sites[index].name
    return next((g, list(group).index(name)) for g, group in enumerate(d.groups(topology)) if name in group)


def peers(topology, d, index: int) -> list[int]:
    """The sites (indices) site `index` links to: its pipeline neighbours in its replica, and its counterpart, the
    site at the same position in the other replica, with which it exchanges pseudo-gradients."""
    groups, names = d.groups(topology), [s.name for s in topology.sites]
    g, j = place(topology, d, index)
    return [names.index(groups[g][k]) for k in (j - 1, j + 1) if 0 <= k < len(groups[g])] + \
        [names.index(groups[1 - g][j])]


def _sizes(topology, d, cfg) -> tuple[list[int], str]:
    """(rows of each replica, how its shares were chosen): the same on both replicas."""
    from hxtrain.core import model_registry
    from hxtrain.training.diloco import replica_rows

    return replica_rows(topology, d, model_registry.preset(cfg.model), cfg.batch_size, cfg.microbatches)


def build(topology, index: int, cfg, d):
    """(LocalSite of this site in its replica's pipeline, a topology of the replica's sites, reading the
    replica's rows; how the shares were chosen): JAX is imported here."""
    from hxtrain.core.placement import sub_topology
    from hxtrain.sites import program as _prog

    sizes, how = _sizes(topology, d, cfg)
    g, j = place(topology, d, index)
    part = sub_topology(topology, d.groups(topology)[g], own_devices=True)  # as the in-process replica's
    local = _prog.LocalSite.build(part, j, dataclasses.replace(cfg, batch_size=sizes[g]))
    first = sum(sizes[:g])  # the replica's rows of every global batch, as the in-process DilocoTrainer's
    corpus, _ = _data.load_split(cfg.data, hold_out=cfg.eval_every > 0, max_bytes=8_000_000,
                                 model_vocab=local.model_config.vocab_size)
    local.batches = _data.batches(corpus, seq=local.seq, batch_size=cfg.batch_size, seed=cfg.seed,
                                  rows=[first + r for r in local.rows])
    return local, how
