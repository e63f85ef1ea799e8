"""What `fastsd bench` prints and writes: the text table, the Markdown results page, the PNG chart."""
from __future__ import annotations

from .settings import COMPONENTS, LABELS


def _components(report: dict) -> tuple:
    """The measured components: text-to-image's four, or with VAE encode for --task img2img / inpaint."""
    return tuple(report["settings"].get("components") or COMPONENTS)


def _ms(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _s(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:,.1f}" if seconds >= 100 else f"{seconds:.2f}" if seconds >= 1 else f"{seconds:.3f}"


def _x(stats: dict) -> str:
    v = stats.get("speedup")
    return f"{v:.2f}x" if v is not None else ""


def _psnr(v) -> str:
    return "inf" if v in ("inf", None) else f"{v:.1f}"


def _grid(rows: list[list[str]], right: set[int] = frozenset(), indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in right and n else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append(indent + "  ".join(cells).rstrip())
        if n == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return out


def header_lines(report: dict) -> list[str]:
    s, m, v, mo = report["settings"], report["machine"], report["versions"], report["model"]
    cores = f"{m['usable_cores']} usable of {m['logical_cores']} logical cores ({m['physical_cores']} physical)"
    hw = m.get("gpu") and f"GPU {m['gpu']} ({m['gpu_memory_gb']} GB, CUDA {m['cuda']}); host " or ""
    load = ""
    if m.get("load_average_start") and m.get("load_average_end"):
        load = f"; load avg (1 min) {m['load_average_start'][0]:.2f} at start, {m['load_average_end'][0]:.2f} at end"
    lines = [
        f"model: {mo['name']} ({'random weights' if mo['random_weights'] else mo['source']}); parameters "
        + ", ".join(f"{k} {n / 1e6:.2f}M" for k, n in mo["parameters"].items()),
        f"run: {s['width']}x{s['height']}, {s['steps']} steps ({s['unet_calls']} UNet calls, {s['scheduler']}), "
        f"guidance {s['guidance']}, seed {s['seed']}, batches {','.join(map(str, s['batches']))}; "
        f"median/min/p90 of {s['repeat']} runs after {s['warmup']} warm-up call(s) per component",
        *([f"task: {s['task']} ({s['pipeline']} as the baseline), strength {s['strength']:g}, input: a red disc on "
           f"blue at {s['width']}x{s['height']}" + (f", mask: the {s['mask']} (white = repaint)" if s.get("mask") else "")
           + f"; {mo.get('unet_in_channels', 4)}-channel UNet"] if s.get("task", "text2img") != "text2img" else []),
        f"machine: {hw}{m['cpu']}; AMX {'yes' if m.get('amx') else 'no'}; {cores}; {m['torch_threads']} torch threads; "
        f"flags {' '.join(m['cpu_flags']) or '-'} (torch {m['cpu_capability']}, oneDNN {m['onednn']}); "
        f"{m['memory_gb']} GB RAM{load}",
        "versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in
                                 ("torch", "diffusers", "transformers", "onnxruntime", "openvino", "fastsd", "python")
                                 if k in v),
    ]
    for b, sh in report["shapes"].items():
        u, d = sh["unet_step"], sh["vae_decode"]
        lines.append(f"shapes (batch {b}): text ids {'x'.join(map(str, sh['text_encoder']['input_ids']))}; "
                     f"UNet sample {'x'.join(map(str, u['sample']))} + text "
                     f"{'x'.join(map(str, u['encoder_hidden_states']))} at t={u['timestep']}"
                     f"{' (guidance batched)' if sh['guidance_batched'] else ''}; VAE latents "
                     f"{'x'.join(map(str, d['latents']))} -> image {'x'.join(map(str, d['image']))}; "
                     f"safety checker on {'x'.join(map(str, sh['safety_checker']['image']))}"
                     + (f"; VAE encode {'x'.join(map(str, sh['vae_encode']['image']))} -> "
                        f"{'x'.join(map(str, sh['vae_encode']['latent_parameters']))}" if "vae_encode" in sh else ""))
    for c in report["configs"]:
        d = c["describe"]
        extra = {k: v for k, v in d.items() if k not in ("backend", "device", "model", "source")}
        lines.append(f"config {c['name']}: " + ", ".join(f"{k}={v}" for k, v in extra.items())
                     + f"; built in {_s(c.get('build_s'))} s")
    for sk in report["skipped"]:
        lines.append(f"skipped {sk['config']}: {sk['reason']}")
    for f in report.get("failed", []):
        lines.append(f"FAILED {f['config']}: {f['reason']}")
    for c in report["configs"]:
        for b, row in c["batches"].items():
            if row.get("consistency") and not row["consistency"]["ok"]:
                lines.append(f"WARNING {c['name']} batch {b}: {row['consistency']['note']}")
    return lines


def table_lines(report: dict) -> list[str]:
    s = report["settings"]
    comps = _components(report)
    out = []
    for b in map(str, s["batches"]):
        out.append("")
        out.append(f"batch {b} (images per call; speed-up vs the diffusers baseline in this run, parity vs its "
                   f"FP32 images)")
        head = ["config"] + [f"{LABELS[c]} ms" for c in comps] + \
            [f"e2e {s['steps']} steps s", f"est. {s['estimate_steps']} steps s", "img/s", "resident MB",
             "PSNR dB", "latent cos", "parity"]
        rows = [head]
        for c in report["configs"]:
            row = c["batches"][b]
            cells = [c["name"] + (" (baseline)" if c["baseline"] else "")]
            for comp in comps:
                st = row["components"][comp]
                cells.append("n/a" if "skipped" in st else f"{_ms(st['median_s'])} {_x(st)}")
            e, est = row["end_to_end"], row["end_to_end_estimate"]
            cells.append(f"{_s(e['median_s'])} {_x(e)}")
            cells.append(f"{_s(est['seconds'])} {_x(est)}")
            cells.append(f"{row['images_per_s']:.3g}" if row["images_per_s"] else "-")
            pm = c["peak_memory"]
            cells.append(f"{pm.get('resident_mb', pm['peak_mb']):,.0f}")
            p = row["parity"]
            if p.get("reference"):
                cells += ["ref", "ref", "reference"]
            else:
                cells += [_psnr(p["psnr_db"]), f"{p['latent_cosine']:.6f}",
                          f"{'pass' if p['passed'] else 'FAIL'} ({p['tolerance'].get('name') or c['dtype']}: >= "
                          f"{p['tolerance']['min_psnr']:g} dB)"]
            rows.append(cells)
        out += _grid(rows, right=set(range(1, len(head) - 1)))
        # spread and warm-up, apart from the medians
        rows = [["config"] + [f"{LABELS[c]} min-p90 ms (warm-up)" for c in comps] + ["e2e min-p90 s"]]
        for c in report["configs"]:
            row = c["batches"][b]
            cells = [c["name"]]
            for comp in comps:
                st = row["components"][comp]
                cells.append("n/a" if "skipped" in st else
                             f"{_ms(st['min_s'])}-{_ms(st['p90_s'])} ({', '.join(_ms(w) for w in st['warmup_s']) or '-'})")
            e = row["end_to_end"]
            cells.append(f"{_s(e['min_s'])}-{_s(e['p90_s'])}")
            rows.append(cells)
        out.append("")
        out += _grid(rows, right=set(range(1, len(rows[0]))))
        rows = [["config"] + [f"{LABELS[c]} CPU s" for c in comps] + ["e2e CPU s"]]
        for c in report["configs"]:
            row = c["batches"][b]
            cells = [c["name"]]
            for st in [row["components"][comp] for comp in comps] + [row["end_to_end"]]:
                cells.append("n/a" if "skipped" in st else
                             f"{_s(st['cpu_median_s'])} {st['cpu_speedup']:.2f}x" if "cpu_speedup" in st else "-")
            rows.append(cells)
        out.append("")
        out.append("  process CPU time per call (median, all threads; less sensitive to other load than wall time)")
        out += _grid(rows, right=set(range(1, len(rows[0]))))
    out.append("")
    encode = ""
    if "vae_encode" in comps:
        n = {c["baseline"]: c["batches"][str(s["batches"][0])]["end_to_end_estimate"].get("vae_encodes")
             for c in report["configs"]}
        fast = n.get(False, n.get(True))
        encode = (f"VAE encode x {fast} + " if fast == n.get(True) else
                  f"VAE encode x {n.get(True)} (diffusers) or {fast} (fastsd: it encodes the masked image only for a "
                  "9-channel UNet, the one that reads it) + ")
    out.append(f"speed-up = diffusers median / config median; est. {s['estimate_steps']} steps = text encoder + "
               f"{encode}{s['estimate_unet_calls']} x UNet step + VAE decode + safety checker (medians, not a "
               "measured run); "
               "resident MB = memory the configuration added when it was built (all configurations stay loaded so "
               "that their repeats interleave: repeat i of every configuration runs before repeat i+1 of any); "
               f"process peak {report['configs'][0]['peak_memory']['peak_mb']:,.0f} MB "
               f"({report['configs'][0]['peak_memory']['method']})")
    return out


def dropin_lines(report: dict) -> list[str]:
    """The drop-in (fastsd.accelerate on the diffusers pipeline) against fastsd's own engine, same run."""
    entries = [c for c in report["configs"] if c.get("vs_engine")]
    if not entries:
        return []
    comps = _components(report)
    out = ["", "drop-in vs engine: fastsd.accelerate(pipe) against fastsd's engine on the same backend, dtype and flags "
           "(engine median / drop-in median; below 1.00x the drop-in is slower)"]
    for b in map(str, report["settings"]["batches"]):
        rows = [["config", "engine"] + [LABELS[c] for c in comps] + ["end to end"]]
        for c in entries:
            r = c["vs_engine"]["batches"].get(b, {})
            rows.append([f"{c['name']} (batch {b})", c["vs_engine"]["engine"]] +
                        [f"{r[k]:.2f}x" if k in r else "n/a" for k in (*comps, "end_to_end")])
        out += _grid(rows, right=set(range(2, len(rows[0]))))
    return out


def peer_lines(report: dict) -> list[str]:
    """--peer: how the peer ran (its export, precision, its own pipeline metrics), and each configuration
    against it, same run: peer median / configuration median (above 1.00x the configuration is faster)."""
    peers = [c for c in report["configs"] if any("own_metrics" in r for r in c["batches"].values())]
    out = []
    for p in peers:
        d = p["describe"]
        out += ["", f"peer {p['name']}: {d['pipeline']} {d['openvino_genai']}, inference precision "
                f"{d['inference_precision']} (CPU capabilities {' '.join(d['cpu_capabilities'])}), compile "
                f"{_s(d['compile_s'])} s; export `{d['export']}` "
                + ("(cached)" if d["export_cached"] else f"({_s(p.get('export_s'))} s)") + " with "
                + ", ".join(f"{k} {v}" for k, v in d["export_versions"].items() if v)]
        for b, row in p["batches"].items():
            own = row["own_metrics"]
            out.append(f"  its own perf metrics (batch {b}): UNet call median {_ms(own['unet_call_median_s'])} ms, "
                       f"generate median {_s(own['generate_median_s'])} s")
            rows = [["config", "UNet step", "VAE decode", "end to end", "PSNR dB"]]
            for c in report["configs"]:
                if c is p or b not in c["batches"]:
                    continue
                r = c["batches"][b]

                def ratio(get):
                    a, x = get(row), get(r)
                    return f"{a / x:.2f}x" if a and x else "n/a"
                rows.append([c["name"], ratio(lambda q: q["components"]["unet_step"].get("median_s")),
                             ratio(lambda q: q["components"]["vae_decode"].get("median_s")),
                             ratio(lambda q: q["end_to_end"].get("median_s")),
                             "ref" if c["baseline"] else _psnr(r["parity"]["psnr_db"])])
            out += [f"  against the peer (batch {b}): peer median / configuration median"] + \
                _grid(rows, right={1, 2, 3, 4}, indent="    ")
    return out


def few_step_lines(report: dict) -> list[str]:
    """--few-step: time per image of the run's generation and of the few-step recipe, per configuration."""
    s, few = report["settings"], report["settings"].get("few_step")
    if not few:
        return []
    out = ["", f"time per image: this run's generation ({s['steps']} steps {s['scheduler']}, guidance {s['guidance']:g}, "
           f"{s['unet_calls']} UNet calls) against few-step ({few['scheduler']}, {few['steps']} steps, guidance "
           f"{few['guidance']:g}: {few['unet_calls']} UNet calls"
           f"{', no classifier-free guidance' if few['guidance'] <= 1 else ''}), end to end, medians of "
           f"{s['repeat']} runs; gain = the run's time / the few-step time of the configuration, vs baseline = "
           f"diffusers' few-step time / the configuration's; parity against the baseline's own "
           f"{few['scheduler']} images"]
    rows = [["config", "batch", f"{s['steps']} steps s/img", f"few-step {few['steps']} s/img", "gain",
             "vs baseline", "PSNR dB", "parity"]]
    for c in report["configs"]:
        for b, row in c["batches"].items():
            st = row.get("few_step") or {}
            if "failed" in st:
                rows.append([c["name"], b, _s(st.get("default_per_image_s")), "FAILED", "", "", "", st["failed"][:60]])
                continue
            p = st.get("parity", {})
            rows.append([c["name"] + (" (baseline)" if c["baseline"] else ""), b, _s(st.get("default_per_image_s")),
                         _s(st.get("per_image_s")), f"{st['vs_default']:.1f}x" if st.get("vs_default") else "-",
                         _x(st) or "-", "ref" if p.get("reference") else _psnr(p.get("psnr_db")),
                         "reference" if p.get("reference") else
                         f"{'pass' if p.get('passed') else 'FAIL'} (>= {p['tolerance']['min_psnr']:g} dB)"])
    return out + _grid(rows, right={1, 2, 3, 4, 5, 6})


def format_report(report: dict) -> str:
    return "\n".join(["fastsd bench"] + ["  " + line for line in header_lines(report)] + table_lines(report)
                     + few_step_lines(report) + dropin_lines(report) + peer_lines(report))


def write_markdown(report: dict, path, command: str):
    from pathlib import Path
    text = ["# fastsd bench: latest results on this machine", "",
            "Regenerate (overwrites this file):", "", "```", command, "```", "",
            f"Measured {report['started']}, {report['wall_s'] / 60:.1f} min wall. "
            "The machine is shared: differences under 10-15% between runs are noise; compare only figures "
            "from one run.", "", "```", format_report(report), "```", ""]
    Path(path).write_text("\n".join(text))


def write_plot(report: dict, path):
    """Grouped bars: per component (and end to end per step), the median time of each configuration,
    one panel per batch size, log scale; speed-up and PSNR in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = report["settings"]
    batches = list(map(str, s["batches"]))
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 4.5), squeeze=False)
    groups = list(_components(report)) + ["end_to_end"]
    for ax, b in zip(axes[0], batches):
        n = len(report["configs"])
        width = 0.8 / max(n, 1)
        x = np.arange(len(groups))
        for i, c in enumerate(report["configs"]):
            row = c["batches"][b]
            vals = [(row["components"][g].get("median_s") or 0) if g != "end_to_end"
                    else row["end_to_end"]["median_s"] for g in groups]
            p = row["parity"]
            label = c["name"] + (" (baseline)" if c["baseline"] else
                                 f"  UNet {row['components']['unet_step'].get('speedup', 0):.2f}x, "
                                 f"PSNR {_psnr(p['psnr_db'])} dB")
            ax.bar(x + (i - (n - 1) / 2) * width, vals, width, label=label)
        ax.set_xticks(x, [LABELS[g] if g != "end_to_end" else f"end to end\n({s['steps']} steps)" for g in groups])
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median, log scale)")
        ax.set_title(f"{report['model']['name']} {s['width']}x{s['height']}, batch {b}")
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"fastsd bench on {m.get('gpu') or m['cpu']}, {m['torch_threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
