"""A site process's steps through the one training loop (`training.loop.run_steps`): what one step of the site
runs (`SiteSteps`), its checkpoints (`SiteSaver`), its metrics file and log lines. Started by `sites.process`
once the site is linked, built and restored."""

from __future__ import annotations


def run_loop(local, transport, cfg, log, start: int = 0, ckpt=None, steps=None) -> list[dict]:
    """Steps start+1 .. cfg.steps through the one training loop; `ckpt` (SiteCheckpoints or None) saves the due
    ones and the last. The site's leader writes metrics-<site>.jsonl and TensorBoard events under tb/<site>."""
    from hxtrain.training.metrics import MetricsWriter
    from hxtrain.training.loop import run_steps

    name = local.site.name
    metrics = None
    if cfg.out and cfg.process_id == 0:  # one metrics file per site, by its leader
        metrics = MetricsWriter(cfg.out, jsonl=f"metrics-{name}.jsonl", tensorboard_dir=f"tb/{name}")

    def report(row):
        loss_txt = "" if row["loss"] is None else f" loss {row['loss']:.6f}"
        loss_txt += f" eval_loss {row['eval_loss']:.6f}" if "eval_loss" in row else ""
        sent = " ".join(f"{k} {v} B" for k, v in row["bytes_per_link"].items())
        log(f"step {row['step']}{loss_txt} grad_norm {row['grad_norm']:.4f} step_s {row['step_s']:.3f} "
            f"sent {sent or '-'} control {row['control_bytes']} B")

    last = cfg.steps if cfg.stop_at is None else cfg.stop_at
    if steps is None:
        steps = SiteSteps(local, transport)
        if cfg.timeline is not None and cfg.process_id in (None, 0):  # the site's leader writes it
            at = last if cfg.timeline_step is None else cfg.timeline_step
            steps.timeline = (site_timeline_path(cfg.timeline, name), at)
    rows = run_steps(steps, first=start + 1, last=last, metrics=metrics, report=report, where=f"site {name!r}: ",
                     saver=None if ckpt is None else SiteSaver(ckpt, local), evaluate=steps.evaluate,
                     eval_every=cfg.eval_every)
    transport.flush()  # what this site sent last (an evaluation's activations) goes ahead of its goodbye
    return rows


def site_timeline_path(path: str, site: str) -> str:
    """Where site `site` writes `--timeline PATH`: the site's name before the suffix (run.json -> run-a.json)."""
    from pathlib import Path

    p = Path(path)
    return str(p.with_name(f"{p.stem}-{site}{p.suffix or '.json'}"))


class SiteSteps:
    """`training.loop.Steps` of a site process: its share of each step over the network transport. `timeline`
    (path, step): record that step's tasks and transfers (`executor.run_step(record=...)`: inputs from the other
    sites show as transfers until they arrived) and write them there as a Chrome trace."""

    def __init__(self, local, transport):
        self.local, self.transport = local, transport
        self.tokens_per_step = local.batch_size * local.seq
        self.learning_rate = local.optimizer.learning_rate
        self.timeline: tuple[str, int] | None = None

    def next_batch(self):
        return self.local.next_batch()

    def evaluate(self) -> float | None:
        return self.local.evaluate(self.transport)

    def run(self, batch, step: int) -> dict:
        t = self.transport
        t.reset_stats()
        t.step = step
        # The step before the one written is recorded too and dropped: recording adds a small program per task
        # (`recorder._marker`), compiled on first use, and that compile time is not the step's.
        recorded = self.timeline is not None and step in (self.timeline[1] - 1, self.timeline[1])
        events = [] if recorded else None
        loss, norm = self.local.train_step(batch, t, record=None if events is None else events.append)
        if recorded and step == self.timeline[1]:
            self._write_timeline(events, step)
        return {"site": self.local.site.name, "loss": loss, "grad_norm": norm, "bytes_per_link": t.bytes_per_link(),
                "payload_bytes_per_link": t.payload_bytes_per_link(), "control_bytes": t.control_bytes}

    def _write_timeline(self, events, step: int) -> None:
        from hxtrain.schedules.timeline import to_chrome_trace

        local = self.local
        names = [s.name for s in local.topology.sites]
        meta = {"site": local.site.name, "step": step, "schedule": local.schedule_name,
                "microbatches": local.microbatches, "topology": local.topology.name}
        to_chrome_trace(events, self.timeline[0], site_names=names, metadata=meta)


class SiteSaver:
    """`training.loop.Saver` of a site's checkpoints. After a failure a site of several processes does not seal:
    sealing waits for every process of the site, and one may be gone."""

    def __init__(self, ckpt, local):
        self.ckpt, self.local = ckpt, local

    def save(self, step: int, *, force: bool = False):
        return self.ckpt.save(step, force=force)

    def close(self, *, failed: bool) -> None:
        if not failed or self.local.processes == 1:
            self.ckpt.close()
