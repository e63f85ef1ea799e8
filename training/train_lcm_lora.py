"""Distill fastsd-shapes into a few-step model: an LCM-LoRA (latent consistency distillation into a LoRA).

    python training/train_lcm_lora.py --threads 1 --out out/loras          # writes out/loras/lcm-shapes.safetensors
    python training/train_lcm_lora.py --eval-only --lora fastsd/models/loras/lcm-shapes.safetensors \
        --eval-scheduler tcd --eval-guidance 1.5      # the shipped adapter at its recipe

The recipe is diffusers' `examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py` at toy scale,
written out here for the shapes model (same maths, no accelerate/webdataset):
  - teacher: the frozen base UNet with classifier-free guidance at `--guidance` (7.5, what the base model is
    calibrated for) and a DDIM solver over `--ddim-steps` (50) timesteps of SD's schedule (k = 1000 / 50);
  - student: the same UNet with a PEFT LoRA (UNet only; text encoder and VAE frozen), one call without
    guidance, read through LCM's boundary conditions (c_skip, c_out of diffusers' LCMScheduler, timestep
    scaling 10): f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t);
  - target: the student itself (no gradient) at the teacher's DDIM step t - k from x_t;
  - loss: pseudo-Huber (c = 0.001) between the two, on latents of scenes drawn by training/shapes_data.py and
    encoded once by the frozen VAE (never the held-out (colour, shape, position) combinations).
With `--target ode` (the runs in docs/few-step.md) the targets are the teacher's own ODE ends instead: every
state of a 50-step guided trajectory from pure noise maps to where it ends. `--visit-steps 4` adds the states
the LCM sampler itself visits at 4 steps (759, 499, 259): after its first step the sampler never sits on such
a trajectory, it noises its clean prediction again with fresh noise, so those states are made the same way
(from the teacher's end, and with `--student-visits-at` from the student's own predictions) and the teacher
solves each to its end. `--cache` keeps the trajectories between runs; `--init-lora` goes on from a run;
`--pixel-loss` adds an L1 loss on the decoded pixels of part of each batch. `--unroll-n` runs the whole
few-step sampler (`--unroll-sampler tcd`: TCD at eta 0, deterministic) from trajectories' start noise, with
gradients, against the teacher's ends (the shipped adapter's run, K0 in docs/few-step.md).
The LoRA is saved with diffusers' own `save_lora_weights` in PEFT's key names (`get_peft_model_state_dict` as it
is, PEFT's config in the metadata), so diffusers and fastsd both load every layer of it. (Passed through
`convert_state_dict_to_diffusers` first, only the attention keys get renamed (`to_k.lora.down`), and diffusers
0.42's loader then drops those 56 layers with a PEFT warning; fastsd fuses them all, as PEFT merges them:
tests/test_lora.py.) It runs with `LCMScheduler` or `TCDScheduler` (fastsd: `--scheduler lcm|tcd`) in 2-8
steps; the shipped one at 4 TCD steps, guidance 1.5; every run's figures are in docs/few-step.md.

Judged on the model's 60 held-out evaluation prompts (prompt i, seed i, 64x64) by fastsd.judge: the base
model at 50 PNDM steps, guidance 7.5 (its default), against the LoRA at 2, 4 and 8 steps of
`--eval-scheduler` at `--eval-guidance` (by default LCM at guidance 1: one UNet call per step instead of
two), both in diffusers FP32.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes_data import held_out_triples, prompt_text, random_prompt  # noqa: E402
from train_shapes import MAX_LEN, SCHEDULE, encode_dataset, lr_at  # noqa: E402

BASE = Path(__file__).resolve().parents[1] / "fastsd" / "models" / "fastsd-shapes"
NAME = "lcm-shapes"
# the layers diffusers' LCM-LoRA script adapts (attention, projections, feed-forward, resnets, resamplers,
# time embedding), as they are named in this UNet
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = alpha_bar.view(-1, 1, 1, 1)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


class Setup:
    """What both targets share: SD's schedule, LCM's boundary conditions, the 50-point timestep grid."""

    def __init__(self, args):
        from diffusers import DDPMScheduler, LCMScheduler
        self.sched = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")
        self.bounds = LCMScheduler(**SCHEDULE)  # c_skip / c_out exactly as the LCM sampler computes them
        self.alpha_bar = self.sched.alphas_cumprod
        self.k = SCHEDULE["num_train_timesteps"] // args.ddim_steps
        self.grid = torch.arange(1, args.ddim_steps + 1) * self.k - 1  # 19, 39, ..., 999: LCM's original timesteps
        # the timesteps LCMScheduler visits after its first at each of --visit-steps (4: 759, 499, 259), taken
        # from the scheduler itself so that training sees exactly the states the sampler will
        self.chains = []
        for n in args.visit_steps:
            s = LCMScheduler(**SCHEDULE, original_inference_steps=args.ddim_steps)
            s.set_timesteps(n)
            self.chains.append([int(t) for t in s.timesteps[1:]])
        self.visit_t = torch.tensor([t for c in self.chains for t in c], dtype=torch.long)
        s = LCMScheduler(**SCHEDULE, original_inference_steps=args.ddim_steps)
        s.set_timesteps(max(args.unroll_steps, 1))
        self.unroll_chain = [int(t) for t in s.timesteps[1:]]

    def sample(self, unet, x, cond, g, sampler="lcm"):
        """The sampler itself, differentiable. lcm: f at 999, then its prediction noised again to each timestep
        of `unroll_chain` with fresh noise and predicted again (LCMScheduler.step); returns the last prediction.
        tcd: TCDScheduler.step at gamma (eta) 0, deterministic: each step's x0 and eps put together again at the
        next timestep (at the end, at t = 0), no fresh noise, so the output is a function of the start noise."""
        if sampler == "tcd":
            ts = [int(self.grid[-1])] + self.unroll_chain
            for t, s in zip(ts, ts[1:] + [0]):
                eps = unet(x, torch.full((len(x),), t), cond).sample
                x0 = x0_from_eps(x, eps, self.alpha_bar[t].repeat(len(x)))
                x = self.alpha_bar[s].sqrt() * x0 + (1 - self.alpha_bar[s]).sqrt() * eps
            return x
        d = self.consistency(unet, x, self.grid[-1].repeat(len(x)), cond)
        for t in self.unroll_chain:
            a = self.alpha_bar[t]
            d = self.consistency(unet, a.sqrt() * d + (1 - a).sqrt() * torch.randn(d.shape, generator=g),
                                 torch.full((len(x),), t), cond)
        return d

    def consistency(self, unet, x, t, cond):
        """f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t): the LCM sampler's `denoised`."""
        c_skip, c_out = (v.view(-1, 1, 1, 1) for v in self.bounds.get_scalings_for_boundary_condition_discrete(t))
        return c_skip * x + c_out * x0_from_eps(x, unet(x, t, cond).sample, self.alpha_bar[t])

    def ddim_step(self, teacher, x, t, t_prev, cond, empty, guidance):
        """One DDIM step t -> t_prev of the teacher with classifier-free guidance; returns (x_prev, x0)."""
        eps_c, eps_u = teacher(torch.cat([x, x]), torch.cat([t, t]),
                               torch.cat([cond, empty.expand(len(x), -1, -1)])).sample.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x0 = x0_from_eps(x, eps, self.alpha_bar[t])
        a_prev = self.alpha_bar[t_prev].view(-1, 1, 1, 1)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0


@torch.no_grad()
def solve(teacher, x, j, cond, empty, setup, guidance, path=None):
    """The teacher's probability-flow ODE (guided DDIM over the 50-point grid) from x at grid index j down to
    t = 0; appends every state it passes (x included) to `path` when given. Returns where it ends."""
    for jj in range(j, -1, -1):
        t = setup.grid[jj].repeat(len(x))
        if path is not None:
            path.append(x)
        x, _ = setup.ddim_step(teacher, x, t, (t - setup.k).clamp(min=0), cond, empty, guidance)
    return x


@torch.no_grad()
def teacher_trajectories(teacher, text_encoder, tok, prompts, empty, setup, args):
    """The teacher's ODE from pure noise, one per prompt: the state at every grid timestep and where it ends
    (every state's target is its end). Then, for the LCM sampler's own states (`setup.visits`), the chain the
    sampler walks: the previous end noised again to the next visited timestep with fresh noise, as
    LCMScheduler.step does, and solved from there. The sampler never sees a state on the first ODE path after
    its first step: it sees a clean prediction noised again, so those states are trained on what they are."""
    g = torch.Generator().manual_seed(args.seed + 1)
    states, ends, visited, targets = [], [], [], []
    t0 = time.time()
    for i in range(0, len(prompts), args.ode_batch):
        ids = tok(prompts[i:i + args.ode_batch], padding="max_length", max_length=MAX_LEN, truncation=True,
                  return_tensors="pt").input_ids
        cond = text_encoder(ids).last_hidden_state
        x = torch.randn((len(ids), 4, 8, 8), generator=g)  # LCMScheduler's start: init_noise_sigma 1 at t=999
        path = []
        end = solve(teacher, x, len(setup.grid) - 1, cond, empty, setup, args.guidance, path)
        states.append(torch.stack(path[::-1], 1))  # [b, grid, 4, 8, 8], grid ascending
        ends.append(end)
        vis, tgt = [], []
        for chain in setup.chains:  # one per sampler step count; 999 left out: its states are the paths' starts
            prev = end
            for t in chain:
                a = setup.alpha_bar[t]
                x = a.sqrt() * prev + (1 - a).sqrt() * torch.randn(prev.shape, generator=g)
                prev = solve(teacher, x, int(t + 1) // setup.k - 1, cond, empty, setup, args.guidance)
                vis.append(x)
                tgt.append(prev)
        if vis:
            visited.append(torch.stack(vis, 1))
            targets.append(torch.stack(tgt, 1))
        print(f"trajectories {i + len(ids)}/{len(prompts)} {time.time() - t0:.0f} s", flush=True)
    cat = (lambda xs: torch.cat(xs) if xs else None)
    return torch.cat(states), torch.cat(ends), cat(visited), cat(targets)


def cached_trajectories(teacher, text_encoder, tok, prompts, empty, setup, args):
    """teacher_trajectories, kept in --cache: they depend only on the prompts, the seed, the guidance and the
    grids, and take most of a run's time, so runs that change only the student's training reuse them."""
    key = {"prompts": prompts, "seed": args.seed, "guidance": args.guidance, "ddim_steps": args.ddim_steps,
           "visit_steps": args.visit_steps, "ode_batch": args.ode_batch}
    if args.cache and args.cache.exists():
        saved = torch.load(args.cache)
        if saved["key"] == key:
            print(f"trajectories from {args.cache}", flush=True)
            return saved["states"], saved["ends"], saved["visited"], saved["targets"]
    out = teacher_trajectories(teacher, text_encoder, tok, prompts, empty, setup, args)
    if args.cache:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(zip(("states", "ends", "visited", "targets"), out), key=key), args.cache)
    return out


@torch.no_grad()
def student_visits(unet, teacher, text_encoder, tok, prompts, starts, empty, setup, args):
    """The states the LCM sampler reaches with the student as it is now (its own prediction noised again, not the
    teacher's end), each with the teacher's end from there: the sampler's states once the student is close,
    which the teacher's own ends only approximate."""
    g = torch.Generator().manual_seed(args.seed + 2)
    visited, targets = [], []
    for i in range(0, len(prompts), args.ode_batch):
        cond = text_encoder(tok(prompts[i:i + args.ode_batch], padding="max_length", max_length=MAX_LEN,
                                truncation=True, return_tensors="pt").input_ids).last_hidden_state
        first = starts[i:i + args.ode_batch]
        vis, tgt = [], []
        for chain in setup.chains:
            d = setup.consistency(unet, first, setup.grid[-1].repeat(len(first)), cond)
            for t in chain:
                a = setup.alpha_bar[t]
                x = a.sqrt() * d + (1 - a).sqrt() * torch.randn(d.shape, generator=g)
                vis.append(x)
                tgt.append(solve(teacher, x, int(t + 1) // setup.k - 1, cond, empty, setup, args.guidance))
                d = setup.consistency(unet, x, torch.full((len(x),), t), cond)
        visited.append(torch.stack(vis, 1))
        targets.append(torch.stack(tgt, 1))
        print(f"student's sampler states {i + len(first)}/{len(prompts)}", flush=True)
    return torch.cat(visited), torch.cat(targets)


def train(unet, text_encoder, tok, prompts, means, stds, scale, args, vae=None):
    setup = Setup(args)
    grid, k = setup.grid, setup.k
    teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=UNET_TARGETS))
    if args.init_lora:  # go on from an earlier run's adapter (same rank), e.g. with its own sampler states
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file
        state = {name.removeprefix("unet."): w for name, w in load_file(args.init_lora).items()}
        assert not set_peft_model_state_dict(unet, state).unexpected_keys
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    ids = tok(prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = text_encoder(tok([""], padding="max_length", max_length=MAX_LEN,
                                 return_tensors="pt").input_ids).last_hidden_state
    if args.target == "ode":
        states, ends, visited, targets = cached_trajectories(teacher, text_encoder, tok, prompts, empty, setup, args)
    g = torch.Generator().manual_seed(args.seed)
    ema_loss, t0 = None, time.time()
    for step in range(args.steps):
        if args.target == "ode" and visited is not None and step == args.student_visits_at:
            v, tg = student_visits(unet, teacher, text_encoder, tok, prompts, states[:, -1], empty, setup, args)
            visited, targets = torch.cat([visited, v], 1), torch.cat([targets, tg], 1)
            setup.visit_t = torch.cat([setup.visit_t, setup.visit_t])
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = torch.randint(0, len(prompts), (args.batch,), generator=g)
        n = torch.randint(0, args.ddim_steps, (args.batch,), generator=g)
        t, t_prev = grid[n], (grid[n] - k).clamp(min=0)
        with torch.no_grad():
            cond = text_encoder(ids[idx]).last_hidden_state
        if args.target == "ode":
            # the consistency function's definition: every state of a trajectory maps to where it ends
            x_t, target = states[idx, n], ends[idx]
            if visited is not None and args.visit_frac > 0:
                # a share of the batch on the sampler's own states: its start (999, the path's first state, m = 0)
                # or a clean end noised again to a timestep it visits, each with the teacher's end from there
                on = torch.rand(args.batch, generator=g) < args.visit_frac
                m = torch.randint(0, len(setup.visit_t) + 1, (args.batch,), generator=g)
                n = torch.where(on & (m == 0), len(grid) - 1, n)
                x_t, t = states[idx, n], grid[n]
                sel, mm = (on & (m > 0)), (m - 1).clamp(min=0)
                x_t = torch.where(sel.view(-1, 1, 1, 1), visited[idx, mm], x_t)
                target = torch.where(sel.view(-1, 1, 1, 1), targets[idx, mm], target)
                t = torch.where(sel, setup.visit_t[mm], t)
        else:  # diffusers' LCM-LoRA recipe: one guided DDIM step of the teacher, the student's own output there
            z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scale
            x_t = setup.sched.add_noise(z, torch.randn(z.shape, generator=g), t)
            with torch.no_grad():
                x_prev, _ = setup.ddim_step(teacher, x_t, t, t_prev, cond, empty, args.guidance)
                target = setup.consistency(unet, x_prev, t_prev, cond)
        pred = setup.consistency(unet, x_t, t, cond)
        loss = pseudo_huber(pred, target)
        if args.pixel_loss:
            # the same distance on the decoded pixels of the first --pixel-n of the batch (the frozen VAE): a
            # latent error on a small shape is a few latent pixels but a whole shape's colour in the image
            n_px = args.pixel_n
            dec = vae.decode(torch.cat([pred[:n_px], target[:n_px]]) / scale).sample
            loss = loss + args.pixel_loss * (dec[:n_px] - dec[n_px:].detach()).abs().mean()
        if args.unroll_n and args.target == "ode":
            # the sampler end to end: --unroll-steps LCM steps from a trajectory's start noise, its image against
            # the teacher's end from the same noise (what the judge looks at: the sampler's output, not one step)
            ui = torch.randint(0, len(prompts), (args.unroll_n,), generator=g)
            with torch.no_grad():
                ucond = text_encoder(ids[ui]).last_hidden_state
            out = setup.sample(unet, states[ui, -1], ucond, g, args.unroll_sampler)
            uloss = pseudo_huber(out, ends[ui])
            if args.pixel_loss:
                dec = vae.decode(torch.cat([out, ends[ui]]) / scale).sample
                uloss = uloss + args.pixel_loss * (dec[:len(ui)] - dec[len(ui):].detach()).abs().mean()
            loss = loss + args.unroll_weight * uloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(args.ema, (1 + step) / (10 + step)))
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} loss {ema_loss:.5f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{time.time() - t0:.0f} s", flush=True)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return ema_loss


def generate(base: Path, prompts, *, lora: Path | None, scheduler: str | None, steps: int, guidance: float,
             eta: float = 0.0, seed_offset: int = 0):
    """diffusers FP32, prompt i with seed i (+ seed_offset), 64x64; a named scheduler (fastsd's names) from the folder's config."""
    from diffusers import StableDiffusionPipeline

    from fastsd.schedulers import make_scheduler
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    images = []
    for i in range(0, len(prompts), 20):
        gens = [torch.Generator().manual_seed(seed_offset + s) for s in range(i, min(i + 20, len(prompts)))]
        images += pipe(prompts[i:i + 20], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                       height=64, width=64, eta=eta).images
    return images


def evaluate(base: Path, lora: Path | None, prompts: list[str], few_steps=(2, 4, 8), base_runs=True,
             scheduler="lcm", guidance=1.0, eta=0.0, seed_offset=0) -> dict:
    """The judge's accuracy of the base model (50 PNDM steps, guidance 7.5) and of the LoRA (by default LCM,
    guidance 1) at each of `few_steps`."""
    from eval_shapes import score
    runs = {} if not base_runs else {
        "base 50 steps pndm guidance 7.5": dict(lora=None, scheduler=None, steps=50, guidance=7.5),
        "base 50 steps ddim guidance 7.5": dict(lora=None, scheduler="ddim", steps=50, guidance=7.5),
        "base 4 steps pndm guidance 7.5": dict(lora=None, scheduler=None, steps=4, guidance=7.5),
        "base 4 steps lcm guidance 1": dict(lora=None, scheduler="lcm", steps=4, guidance=1.0)}
    if lora is not None:
        runs.update({f"lcm-lora {n} steps {scheduler} guidance {guidance:g}" + (f" eta {eta:g}" if eta else ""):
                     dict(lora=lora, scheduler=scheduler, steps=n, guidance=guidance, eta=eta) for n in few_steps})
    out = {}
    for name, kw in runs.items():
        t0 = time.perf_counter()
        res = score(generate(base, prompts, **kw, seed_offset=seed_offset), prompts)
        verdicts = res.pop("verdicts")
        res["found_colours"] = [str(v.found_colour) for v in verdicts]
        out[name] = dict(res, seconds=round(time.perf_counter() - t0, 1))
        print(f"{name:<40} shape colour {res['shape_colour']:.1%}  background {res['background']:.1%}  "
              f"shape {res['shape']:.1%}  {out[name]['seconds']} s", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=BASE)
    ap.add_argument("--out", type=Path, default=Path("out/loras"), help=f"folder for {NAME}.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--target", choices=("ode", "bootstrap"), default="ode",
                    help="ode: each state of the teacher's guided 50-step ODE maps to where it ends (the consistency "
                         "function's definition, computed once); bootstrap: diffusers' LCM-LoRA recipe (one teacher "
                         "DDIM step, then the student's own output as the target)")
    ap.add_argument("--trajectories", type=int, default=2000, help="ode: teacher trajectories, one prompt each")
    ap.add_argument("--ode-batch", type=int, default=250, help="ode: trajectories solved together")
    ap.add_argument("--scenes", type=int, default=6000, help="bootstrap: scenes drawn and encoded once")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved LoRA weights")
    ap.add_argument("--guidance", type=float, default=7.5, help="the teacher's classifier-free guidance")
    ap.add_argument("--ddim-steps", type=int, default=50, help="the teacher's DDIM grid (LCM's original_inference_steps)")
    ap.add_argument("--visit-steps", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="ode: comma list of LCM step counts whose sampler states (a clean end noised again to each "
                         "timestep the sampler visits) are solved by the teacher and trained on, e.g. 4 or 2,4,8")
    ap.add_argument("--student-visits-at", type=int, default=-1,
                    help="ode, with --visit-steps: at this training step, add the states the sampler reaches with "
                         "the student as it is then (its prediction noised again), each solved by the teacher")
    ap.add_argument("--pixel-loss", type=float, default=0.0,
                    help="weight of an L1 loss on decoded pixels (the frozen VAE) added to the latent loss")
    ap.add_argument("--pixel-n", type=int, default=8, help="with --pixel-loss: how many of each batch are decoded")
    ap.add_argument("--unroll-steps", type=int, default=4, help="ode: the step count --unroll-n samples with")
    ap.add_argument("--unroll-n", type=int, default=0,
                    help="ode: per training step, run the whole --unroll-sampler (differentiably) on this many start "
                         "noises and add a loss between its output and the teacher's end from the same noise")
    ap.add_argument("--unroll-sampler", choices=("lcm", "tcd"), default="lcm",
                    help="the sampler unrolled: lcm (LCMScheduler) or tcd (TCDScheduler at eta 0, deterministic)")
    ap.add_argument("--unroll-weight", type=float, default=1.0, help="weight of that loss")
    ap.add_argument("--init-lora", type=Path, help="start from this adapter (this script's output, same --rank)")
    ap.add_argument("--cache", type=Path, help="ode: file that keeps the teacher's trajectories between runs")
    ap.add_argument("--visit-frac", type=float, default=0.5, help="ode: share of each batch on those states")
    ap.add_argument("--eval-lora-only", action="store_true",
                    help="judge only the adapter (the base model's rows are in docs/few-step.md)")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--lora", type=Path, help="with --eval-only: the adapter to score")
    ap.add_argument("--eval-scheduler", choices=("lcm", "tcd"), default="lcm",
                    help="the evaluation's sampler for the adapter")
    ap.add_argument("--eval-guidance", type=float, default=1.0, help="the evaluation's guidance for the adapter")
    ap.add_argument("--eval-eta", type=float, default=0.0, help="the evaluation's eta (TCD's gamma)")
    ap.add_argument("--eval-seed-offset", type=int, default=0,
                    help="the evaluation: prompt i with seed N + i instead of i (the same prompts, other images)")
    ap.add_argument("--eval-n", type=int, default=0, help="judge the first N evaluation prompts only (0: all 60)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = json.loads((args.base / "eval_prompts.json").read_text())
    prompts = prompts[:args.eval_n] if args.eval_n else prompts

    def judge(lora):
        return evaluate(args.base, lora, prompts, base_runs=not args.eval_lora_only, scheduler=args.eval_scheduler,
                        guidance=args.eval_guidance, eta=args.eval_eta, seed_offset=args.eval_seed_offset)
    if args.eval_only:
        res = judge(args.lora)
        print(json.dumps({k: {m: v for m, v in r.items() if m != "found_colours"} for k, r in res.items()}, indent=1))
        return

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed + 7)
    t0 = time.time()
    tok = CLIPTokenizer.from_pretrained(str(args.base / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(args.base / "vae")).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(str(args.base / "unet")).requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(str(args.base / "text_encoder")).eval().requires_grad_(False)
    if args.target == "ode":  # the teacher draws the targets itself: prompts only, never the held-out combinations
        exclude = held_out_triples()
        train_prompts = [prompt_text(random_prompt(rng, exclude), rng) for _ in range(args.trajectories)]
        means = stds = None
    else:
        train_prompts, means, stds = encode_dataset(vae, rng, held_out_triples(), args.scenes)
    t_enc = time.time() - t0
    loss = train(unet, text_encoder, tok, train_prompts, means, stds, vae.config.scaling_factor, args, vae)
    t_train = time.time() - t0 - t_enc
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{NAME}.safetensors"
    StableDiffusionPipeline.save_lora_weights(
        str(args.out), weight_name=name, safe_serialization=True,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    res = judge(args.out / name)
    stats = {"command": "python training/train_lcm_lora.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "args": {k: str(v) for k, v in vars(args).items()}, "unet_targets": UNET_TARGETS,
             "final_loss": round(loss, 6), "bytes": (args.out / name).stat().st_size,
             "seconds": {"encode": round(t_enc), "train": round(t_train), "total": round(time.time() - t0)},
             "torch": torch.__version__, "eval_prompts": f"fastsd/models/fastsd-shapes/eval_prompts.json (the first {len(prompts)})",
             "judge": res}
    (args.out / f"{NAME}.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k not in ("args", "judge")}, indent=1))


if __name__ == "__main__":
    main()
