"""Two side-by-side tables of the report: the soft-cap / logit-scale rows against their plain rows, and
ptd against TRL 1.16's fused kernels."""

from __future__ import annotations

from report_data import Results, fmt_bytes, fmt_ratio, fmt_time, mem_cell, ok, peak, ratio, time_ratios, working


def _ratio_text(a, b, show_cpu):
    wall, cpu = time_ratios(a, b)
    text = fmt_ratio(wall)
    if show_cpu and cpu is not None:
        text += f" (CPU {fmt_ratio(cpu)})"
    return text


def transform_table(res: Results, show_cpu: bool = False) -> list[str]:
    """Per op and shape: the plain ptd row, then each logit-transform variant of it with its time
    ratio to the plain row (measured in the same run) and its peak memory."""
    variant_rows = [r for r in res.main if r.get("variant")]
    if not variant_rows:
        return []
    labels = []
    for r in variant_rows:
        label = r["method"].removeprefix(r["base_method"] + " + ")
        if label not in labels:
            labels.append(label)
    out = ["| op | ptd entry point | plain | " + " | ".join(f"+ {x} (× plain)" for x in labels)
           + " | peak memory: plain / " + " / ".join(labels) + " |",
           "| --- | --- | ---: | " + " | ".join("---:" for _ in labels) + " | ---: |"]
    shapes = res.shapes(res.main)
    seen = []
    for r in variant_rows:
        key = (r["shape"], r["op"], r["base_method"])
        if key in seen:
            continue
        seen.append(key)
        shape, op, base_method = key
        plain = next((p for p in res.find(res.main, op=op, shape=shape, method=base_method) if not p.get("variant")),
                     None)
        cells, mems = [], [mem_cell(plain, peak(plain)) if plain and ok(plain) else "—"]
        for label in labels:
            v = next((x for x in variant_rows if x["shape"] == shape and x["op"] == op
                      and x["method"] == f"{base_method} + {label}"), None)
            if v is None:
                cells.append("")
                mems.append("")
            elif not ok(v):
                cells.append(v.get("status", "?"))
                mems.append("—")
            else:
                rel = f" ({_ratio_text(v, plain, show_cpu)})" if plain and ok(plain) else ""
                cells.append(f"{fmt_time(v['median'])}{rel}")
                mems.append(mem_cell(v, peak(v)))
        plain_cell = fmt_time(plain["median"]) if plain and ok(plain) else (plain or {}).get("status", "not measured")
        name = op if len(shapes) == 1 else f"{op} ({shape})"
        out.append(f"| {name} | {base_method} | {plain_cell} | " + " | ".join(cells) + " | " + " / ".join(mems) + " |")
    return out


TRL_OPS = ("jsd", "logprobs+entropy", "logprobs")


def trl_table(res: Results, show_cpu: bool = False) -> list[str]:
    """Per op and shape: TRL's fused kernel against the fastest plain ptd entry point of the op (the
    same quantity, checked at set-up): time, peak memory and working memory (peak − input grads)."""
    rows = [r for r in res.main if r["method"].startswith("TRL ")]
    if not rows:
        return []
    out = ["| op | TRL kernel | TRL time | ptd entry point | ptd time | ptd / TRL time | TRL peak | ptd peak | "
           "ptd / TRL peak | working memory: TRL / ptd |",
           "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    shapes = res.shapes(res.main)
    for shape in shapes:
        for op in TRL_OPS:
            for trl in [r for r in rows if r["op"] == op and r["shape"] == shape]:
                name = op if len(shapes) == 1 else f"{op} ({shape})"
                ours = res.best_ours(res.main, op, shape)
                if not ok(trl) or ours is None:
                    trl_cell = fmt_time(trl["median"]) if ok(trl) else trl.get("status", "?")
                    out.append(f"| {name} | {trl['method']} | {trl_cell} | {ours['method'] if ours else 'not run'} | "
                               f"{fmt_time(ours['median']) if ours else '—'} | — | — | — | — | — |")
                    continue
                out.append(
                    f"| {name} | {trl['method']} | {fmt_time(trl['median'])} | {ours['method']} | "
                    f"{fmt_time(ours['median'])} | {_ratio_text(ours, trl, show_cpu)} | {mem_cell(trl, peak(trl))} | "
                    f"{mem_cell(ours, peak(ours))} | {fmt_ratio(ratio(peak(ours), peak(trl)))} | "
                    f"{fmt_bytes(working(trl))} / {fmt_bytes(working(ours))} |")
    checks = sorted({r["check"] for r in rows if r.get("check")})
    out += ["", *[f"Correctness: {c}." for c in checks]] if checks else []
    return out
