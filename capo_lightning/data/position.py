"""Where the training stream stands: the count of rollout batches, owned and checkpointed by the
DataModule."""

from __future__ import annotations


class TrainPosition:
    """How many training batches the stream has handed out, and how many of them a checkpoint counts
    as trained.

    The count alone places the stream: batch ``k`` of a run is rollout step ``k``, and its prompts
    and sampling seed are a pure function of (seed, k, rank)
    (:class:`~capo_lightning.data.order.PromptOrder`). DAPO's dynamic-sampling rounds add nothing to
    it: the refill prompts of step ``k`` come from a stream reserved for that step
    (``PromptOrder.refill_item(k, round, ...)``), and a step's rounds always run to completion
    inside the batch. Every rank counts the same batches, so one number serves all ranks.

    A batch counts as *trained* once the Trainer has processed it (its training step returned). A
    checkpoint written while the newest batch is still being trained on (``InterruptCheckpoint`` on
    Ctrl-C, or a crash inside the step or the batch's transfer) records the position before that
    batch, so a resume replays it, as Lightning itself restarts from the last processed batch. The
    Trainer's processed count is what the caller passes in (None: no Trainer, every batch handed out
    counts).
    """

    def __init__(self) -> None:
        self.batches = 0  # batches handed out: the next one is rollout step ``batches``
        # the Trainer's processed count at the newest hand-out
        self._processed_before_newest: int | None = None

    def handed_out(self, processed: int | None) -> None:
        """Count the batch just made; ``processed`` is the Trainer's count of processed batches
        before it."""
        self.batches += 1
        self._processed_before_newest = processed

    def trained(self, processed: int | None) -> int:
        """Batches trained on, given the Trainer's processed count now: the newest one only once it
        is processed."""
        before = self._processed_before_newest
        unfinished = before is not None and processed is not None and processed <= before
        return self.batches - int(unfinished)

    def restart(self, batches: int) -> None:
        """Continue after ``batches`` trained batches (a restored checkpoint); nothing is in
        flight."""
        if batches < 0:
            raise ValueError(f"a data position counts batches, so it is >= 0; got {batches}")
        self.batches, self._processed_before_newest = batches, None

    def new_run(self) -> None:
        """A new Trainer run starts: its processed count starts afresh, and the batches handed out
        so far stand."""
        self._processed_before_newest = None
