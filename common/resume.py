"""What of a generation task reached its caller, and resuming it from there elsewhere: the scheduler migrates a
stream off a lost worker, the gateway moves one off a lost scheduler, both the same way (GenerateInput.resume, or
resume_choices for n > 1: each choice's token ids and their text's length in code points; the worker computes
prompt + those tokens, counts them as generated, and a seeded generator skips their draws; a finished choice is
not run again)."""

from __future__ import annotations

import dataclasses

from llmserve.dispatch.v1 import task_pb2


@dataclasses.dataclass
class ChoiceSent:
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text_length: int = 0  # of the choice's text, in code points
    completion_tokens: int = 0
    finished: bool = False

    def state(self) -> task_pb2.ResumeState:
        return task_pb2.ResumeState(token_ids=self.token_ids, text_length=self.text_length, finished=self.finished)


@dataclasses.dataclass
class Sent:
    num_outputs: int = 0
    choices: dict[int, ChoiceSent] = dataclasses.field(default_factory=dict)

    def choice(self, index: int) -> ChoiceSent:
        return self.choices.setdefault(index, ChoiceSent())

    @property
    def token_ids(self) -> list[int]:
        """Choice 0's."""
        return self.choice(0).token_ids

    def note(self, output: task_pb2.TaskOutput) -> None:
        self.num_outputs += 1
        choice = self.choice(output.index)
        choice.token_ids.extend(output.token_ids)
        choice.text_length += len(output.text_delta)
        choice.completion_tokens = max(choice.completion_tokens, output.completion_tokens)
        choice.finished = choice.finished or bool(output.finish_reason)

    def why_not_resumable(self, task: task_pb2.Task) -> str:
        """Why the task cannot resume elsewhere (written for the caller), or "" when it can: from where it is, or
        from the start when nothing reached the caller."""
        if not self.num_outputs:
            return ""
        if task.WhichOneof("input") != "generate":
            return "an embeddings call that had answered is not migrated; retry it"
        if any(c.completion_tokens > len(c.token_ids) for c in self.choices.values()):
            return "the worker did not report the ids of the tokens it sent; retry it"
        return ""

    def resumed(self, task: task_pb2.Task) -> task_pb2.Task:
        """A copy of the task (as submitted) that resumes from what was sent."""
        copy = task_pb2.Task()
        copy.CopyFrom(task)
        if not self.num_outputs:
            return copy
        n = max(1, copy.generate.n)
        if n == 1:
            copy.generate.resume.CopyFrom(self.choice(0).state())
            copy.generate.resume.ClearField("finished")
        else:
            copy.generate.resume_choices.extend(self.choice(j).state() for j in range(n))
        return copy
