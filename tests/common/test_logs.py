"""Services write their log lines in batches: info lines within max_delay_s, warnings and errors at once, and
nothing lost at a normal exit."""

from __future__ import annotations

import io
import subprocess
import sys
import time

from llmserve.common.logs import BufferedLineWriter, BufferedLogger


def test_info_lines_are_batched_and_warnings_written_at_once():
    out = io.StringIO()
    logger = BufferedLogger(BufferedLineWriter(out, max_delay_s=0.3))
    logger.info("one")
    logger.info("two")
    assert out.getvalue() == ""  # batched
    logger.warning("three")  # at once, after what came before it
    assert out.getvalue() == "one\ntwo\nthree\n"
    logger.info("four")
    deadline = time.monotonic() + 5
    while "four" not in out.getvalue():
        assert time.monotonic() < deadline, "an info line was not written within its delay"
        time.sleep(0.05)


def test_a_full_buffer_is_written_without_waiting():
    out = io.StringIO()
    logger = BufferedLogger(BufferedLineWriter(out, max_delay_s=60, max_bytes=100))
    for i in range(20):
        logger.info(f"line {i:02d}")
    assert "line 00" in out.getvalue()


def test_lines_buffered_at_exit_are_written():
    code = ("from llmserve.common.logs import configure_logging, get_logger\n"
            "configure_logging('info', True, 'test', buffered=True)\n"
            "get_logger('x').info('last words', n=1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert '"event": "last words"' in done.stderr and done.returncode == 0
