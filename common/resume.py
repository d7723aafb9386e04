"""What of a generation task reached its caller, and resuming it from there elsewhere: the scheduler migrates a
stream off a lost worker, the gateway moves one off a lost scheduler, both the same way (GenerateInput.resume:
choice 0's token ids and their text's length in code points; the worker computes prompt + those tokens, counts
them as generated, and a seeded generator skips their draws)."""

from __future__ import annotations

import dataclasses

from llmserve.dispatch.v1 import task_pb2


@dataclasses.dataclass
class Sent:
    num_outputs: int = 0
    token_ids: list[int] = dataclasses.field(default_factory=list)  # of choice 0
    text_length: int = 0  # of choice 0's text, in code points
    completion_tokens: int = 0

    def note(self, output: task_pb2.TaskOutput) -> None:
        self.num_outputs += 1
        if output.index == 0:
            self.token_ids.extend(output.token_ids)
            self.text_length += len(output.text_delta)
            self.completion_tokens = max(self.completion_tokens, output.completion_tokens)

    def why_not_resumable(self, task: task_pb2.Task) -> str:
        """Why the task cannot resume elsewhere (written for the caller), or "" when it can: from where it is, or
        from the start when nothing reached the caller."""
        if not self.num_outputs:
            return ""
        if task.WhichOneof("input") != "generate":
            return "an embeddings call that had answered is not migrated; retry it"
        if task.generate.n > 1:
            return f"streams of n={task.generate.n} choices are not migrated; retry it"
        if self.completion_tokens > len(self.token_ids):
            return "the worker did not report the ids of the tokens it sent; retry it"
        return ""

    def resumed(self, task: task_pb2.Task) -> task_pb2.Task:
        """A copy of the task (as submitted) that resumes from what was sent."""
        copy = task_pb2.Task()
        copy.CopyFrom(task)
        if self.num_outputs:
            copy.generate.resume.token_ids[:] = self.token_ids
            copy.generate.resume.text_length = self.text_length
        return copy
