"""Which step of a run's sigma schedule each model call belongs to, and which steps the sampler went
through without running the model: StepTracker, the part of the recorder store (``recorder_store.py``)
that places calls in steps and says why chosen steps were not recorded. The step selection itself is
``step_selection.py``'s.
"""

from __future__ import annotations

import torch

from .step_selection import steps_label

# Why the model did not run at steps the sampler went through, where a conditioning entry was active.
_SKIPPED_BY_CACHE = (
    "a node that reuses earlier model outputs instead of running the model, such as EasyCache or LazyCache, "
    "skipped them"
)
# Why a sampler that does not report the schedule's steps made no model call in some of them (LazyCache
# skips whole evaluations, under such a sampler as under any other).
_OWN_SIGMAS = (
    "samplers such as dpm_fast and dpm_adaptive choose their own sigmas, and a node such as LazyCache skips "
    "whole model evaluations"
)


def _sigma_value(sig) -> float:
    """A model call's sigma (a tensor of one sigma per image, or a number) as a float: for a tensor on
    a GPU this waits for the GPU to reach it."""
    return float(sig.max()) if torch.is_tensor(sig) else float(sig)


class StepTracker:
    """The step part of a record node's store (_Store): places each model call in a step of the run's sigma
    schedule (_step_of), from its sigma or, for 'last', from the sampler's step reports, and keeps the
    steps seen for the messages. Reads the store's ``steps`` (StepSelection), ``eval_id``, ``active`` and
    ``branch``."""

    # -- the steps seen in a run -------------------------------------------------------------------
    def _reset_steps(self, sigmas) -> None:
        """Forgets the steps seen: a run over ``sigmas`` starts, or none (None)."""
        self.sigmas = sigmas  # python floats, len = steps + 1
        self.max_step = -1  # latest step of a recorded-branch call
        self.max_step_any = -1  # latest step of any main-pass call (either branch)
        self.steps_run: set[int] = set()  # the steps of the main-pass calls whose step was read
        # step -> whether a conditioning entry was active in a main-pass calc_cond_batch call at that step
        # that ran no recorded layer (note_idle): False = none was (a timestep range), so the model had
        # nothing to run there; True = one was, yet the model did not run (a cache node skipped it)
        self.idle_steps: dict[int, bool] = {}
        self.min_sigma = float("inf")  # lowest sigma of a main-pass call
        self._sig_obj = None
        self._sig_step = 0
        self._sig_eval = None  # the model evaluation (eval_id) of the call whose step _sig_step is
        self._sig_estimated = False  # _sig_step is an estimate from the step reports (no sigma read)
        # (sigma, estimated step) of the evaluations whose step was estimated (any branch, and the recorded
        # branch's): read only when a message needs the steps seen (_settle_estimates), never while sampling
        self._estimated_sig = {"any": [], "branch": []}
        # the sampler's own step reports (step_done), when it is one whose reports count the schedule's
        # steps: they tell 'last' which calls are certainly earlier without reading their sigma
        self.reports_steps = False
        self.reported = -1  # the latest step the sampler reported done
        self.evals_since_report = 0  # model evaluations since that report (or since the run began)

    def step_done(self, step) -> None:
        """The sampler reports that it finished ``step`` (its progress callback)."""
        if self.active:
            self.reported = max(self.reported, int(step))
            self.evals_since_report = 0

    @property
    def n_steps(self) -> int:
        """Steps of the current run's sigma schedule."""
        return max(len(self.sigmas or []) - 1, 0)

    def _settle_estimates(self):
        """Folds the calls whose step was only estimated into the steps and sigmas seen, reading their
        sigma now (for a message; the estimate is right about 'before the last step', but a corrector
        within step i, e.g. dpmpp_sde's, would count as step i + 1)."""
        for which, sigs in self._estimated_sig.items():
            for sig, estimate in sigs:
                step = self._read_step(sig, estimate)
                self.max_step_any = max(self.max_step_any, step)
                self.steps_run.add(step)
                if which == "branch":
                    self.max_step = max(self.max_step, step)
        self._estimated_sig = {"any": [], "branch": []}

    def note_idle(self, sigma, active: bool) -> None:
        """A main-pass calc_cond_batch call at ``sigma`` ran no recorded layer; ``active``: whether one of
        its conditioning entries was active there (ComfyUI's get_area_and_mult). Rare: read at once."""
        step = self._schedule_step(_sigma_value(sigma), self._order_floor())
        self._sig_obj, self._sig_step, self._sig_estimated, self._sig_eval = sigma, step, False, self.eval_id
        self.idle_steps[step] = self.idle_steps.get(step, False) or active

    def _not_run(self, steps) -> list[int]:
        """Of ``steps``, those the sampler went through with no main-pass model call in them: reported
        done (step_done) by a sampler whose reports count the schedule's steps, or, by any other sampler,
        asked for a prediction there that ran no recorded layer (note_idle). Only once the run's calls are
        placed (_settle_estimates; 'mean' places none)."""
        if self.steps.mode == "mean":
            return []
        if not self.reports_steps:  # (uni_pc, dpm_fast, a rising schedule): only the calls it made tell
            return [i for i in steps if i in self.idle_steps and i not in self.steps_run]
        return [i for i in steps if i <= self.reported and i not in self.steps_run]

    def _not_evaluated(self, steps) -> list[int]:
        """Of ``steps``, those in which a sampler that does not report the schedule's steps (dpm_fast,
        dpm_adaptive: they choose their own sigmas) asked for no prediction at all (nor did the guider run:
        LazyCache), main pass or not run."""
        if self.reports_steps or self.steps.mode == "mean":
            return []
        return [i for i in steps if i not in self.steps_run and i not in self.idle_steps]

    def _skipped_by_cache(self, steps) -> list[int]:
        """Of ``steps``, those where the model did not run though a conditioning entry was active, or
        the guider was not even asked (LazyCache skips whole evaluations): not a timestep range's doing."""
        return [i for i in self._not_run(steps) if self.idle_steps.get(i, True)]

    def _steps_it_ran(self) -> str:
        """The steps to choose instead of steps the recorded branch never reached (it ran up to step
        max_step): those up to max_step, or the steps the model ran where it skipped some before
        (LazyCache)."""
        if any(i not in self.steps_run for i in range(self.max_step)):
            return f"steps the model ran ({steps_label(self.steps_run)})"
        return f"steps up to {self.max_step}"

    def _why_skipped(self, skipped) -> list[str]:
        """Why the recorded branch was not called at the chosen steps ``skipped``, of a run that recorded
        others: a cache node skipped the model there, the sampler evaluated none of their sigmas, or the
        branch's conditioning was not active there -> one clause per reason found."""
        why = []
        cached = self._skipped_by_cache(skipped)
        unseen = self._not_evaluated(i for i in skipped if i not in cached)
        inactive = [i for i in skipped if i not in cached and i not in unseen]
        if cached:
            why.append(f"the model did not run at step(s) {steps_label(cached)} ({_SKIPPED_BY_CACHE})")
        if unseen:
            why.append(f"the sampler evaluated the model at none of the sigmas of step(s) "
                       f"{steps_label(unseen)} ({_OWN_SIGMAS})")
        if inactive:
            why.append(
                f"the '{self.branch}' conditioning was not called at step(s) {steps_label(inactive)} "
                "(a timestep range ends or starts it there)"
            )
        return why

    # -- per call: the step a model call belongs to ----------------------------------------------
    def _step_of(self, extra_options) -> int:
        """The step a model call belongs to (_schedule_step: sigmas[i+1] < sigma <= sigmas[i] on a falling
        schedule), estimated from the sampler's step reports where that tells 'last' enough."""
        sig = extra_options.get("sigmas")
        if sig is None:
            self._sig_estimated = False
            return 0
        if sig is self._sig_obj and self._sig_eval == self.eval_id:
            return self._sig_step
        if self._before_last_by_reports():  # an estimate: certainly before the last step (see observe)
            self._sig_obj, self._sig_step, self._sig_estimated = sig, self.reported + 1, True
            self._sig_eval = self.eval_id
            return self._sig_step
        step = self._read_step(sig, self._order_floor())
        self._sig_obj, self._sig_step, self._sig_estimated, self._sig_eval = sig, step, False, self.eval_id
        return step

    def _read_step(self, sig, floor: int) -> int:
        """The step of a call's sigma, read (a device sync on a GPU); ``floor``: see _schedule_step."""
        s = _sigma_value(sig)
        self.min_sigma = min(self.min_sigma, s)
        return self._schedule_step(s, floor)

    def _order_floor(self) -> int:
        """The earliest step the model call being placed can be in where its sigma fits several steps:
        the step of the call placed before it (samplers go through the schedule in order), or the one
        after that when that step is zero-length (a repeated sigma) and this call starts another model
        evaluation (a zero-length step of a first-order sampler is one evaluation)."""
        step = self._sig_step if self._sig_obj is not None else -1
        another_eval = self.eval_id != self._sig_eval or self.eval_id == 0  # (0: no guider, each call counts)
        if another_eval and 0 <= step < self.n_steps and self._zero_length(step):
            step += 1
        return step

    def _zero_length(self, i: int) -> bool:
        """Whether step i of this run's schedule starts and ends at one sigma (the `simple` scheduler
        repeats sigmas at a denoise below steps / 1000)."""
        cur, nxt = self.sigmas[i], self.sigmas[i + 1]
        return abs(cur - nxt) <= 1e-5 * max(abs(nxt), 1e-3)

    def _schedule_step(self, s: float, floor: int = -1) -> int:
        """The step i of this run's schedule that ``s`` belongs to: sigmas[i+1] < s <= sigmas[i] where the
        schedule falls (step 0 above sigmas[0] too), sigmas[i] <= s < sigmas[i+1] where it rises
        (FlipSigmas' ascending schedule for unsampling), s = sigmas[i] where step i is zero-length (a
        repeated sigma); the last step when none. Where s fits several steps (a repeated sigma, a
        hand-made schedule that falls and rises again, as a restart schedule does), the first of them at
        or after ``floor`` (how far the sampler got: _order_floor), else the last of them."""
        schedule = self.sigmas
        found, first = set(), None
        for i in range(len(schedule) - 1):
            cur, nxt = schedule[i], schedule[i + 1]
            tol, tol_cur = 1e-5 * max(abs(nxt), 1e-3), 1e-5 * max(abs(cur), 1e-3)
            if first is None and ((s > nxt + tol) if nxt <= cur else (s < nxt - tol)):
                first = i  # the first step s is in, or above (a sigma raised by s_churn counts there)
                found.add(i)
            if self._zero_length(i):
                if abs(s - cur) <= tol_cur:
                    found.add(i)
            elif (nxt + tol < s <= cur + tol_cur) if nxt < cur else (cur - tol_cur <= s < nxt - tol):
                found.add(i)
        if not found:
            return max(len(schedule) - 2, 0)
        found = sorted(found)
        later = [i for i in found if i >= floor]
        return later[0] if later else found[-1]

    def _before_last_by_reports(self) -> bool:
        """'last' only: whether the model call being made is certainly in an earlier step than the last,
        known without reading its sigma (on a GPU a device sync at every model call, about half of
        recording's cost there). After the sampler reported step i, its next evaluation is the first
        of step i + 1, or a corrector of step i (heun's at sigma i + 1, dpmpp_sde's, sa_solver_pece's
        within step i): either way before the last step while i + 2 < last, on a schedule that never
        rises (begin_run). Its step is then an estimate, kept out of the steps seen (_settle_estimates)."""
        last = len(self.sigmas or []) - 2
        return (
            self.steps.mode == "last" and self.reports_steps and self.evals_since_report == 1
            and self.reported + 2 < last
        )

    def _note_estimate(self, which: str, extra_options) -> None:
        """Keeps the sigma of a call whose step was estimated, with that estimate, once per model call (its
        layers share it)."""
        sigs, sig = self._estimated_sig[which], extra_options.get("sigmas")
        if not sigs or sigs[-1][0] is not sig:
            sigs.append((sig, self._sig_step))

    def _wants(self, step: int) -> bool:
        """Whether ``step`` is one of the steps the store's step selection records."""
        if self.steps.mode == "last":
            return step == max(len(self.sigmas) - 2, 0)
        if self.steps.mode == "mean":
            return True
        return self.steps.first <= step <= self.steps.last
