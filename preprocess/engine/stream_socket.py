"""Token streaming from the generator's engines to the `generator_stream` model.

Triton runs every model in its own stub process, and the engines live in the generator's.
A Triton model that streams must be decoupled, and an ensemble with a decoupled step is
decoupled as a whole, which Triton's HTTP /infer refuses: the judge's path and plain
tritonclient HTTP would have to move to gRPC streaming. So `llm` stays as it is, and the
streaming ensemble `llm_stream` ends in `generator_stream`, a decoupled model that holds
no engine: it relays each request over a local socket to this server, which runs in the
generator's process and feeds the same engines (no second copy of the weights).

Protocol, one connection per answer, newline-delimited JSON:
- the client sends one line: {"prompt_ids": [...], "values": {SamplingSettings field: value}};
- the server sends {"text", "tokens", "prompt_tokens", "finish_reason", "logprobs",
  "token_ids"} per piece (finish_reason null until the last), or one {"error", "kind"} line;
- the client closing the connection aborts the generation in vLLM.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

from ..contract import InvalidRequest
from ..errors import ErrorKind
from .generation import generation_items

log = logging.getLogger("generator.stream")

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # one prompt's ids and its settings
UNIX_PATH_MAX = 100  # sun_path holds 108 bytes on Linux; keep a margin


def socket_path(runtime_dir: Path | None) -> Path:
    """Where the generator listens. Both models' stubs are children of the same
    tritonserver: its pid tells this server's socket from another Triton's on the host.
    The runtime folder (under ./build.sh serve) is used when its path is short enough."""
    if runtime_dir is not None and len(str(runtime_dir / "stream.sock")) < UNIX_PATH_MAX:
        return runtime_dir / "stream.sock"
    return Path(tempfile.gettempdir()) / f"llm-{os.getuid()}" / f"stream-{os.getppid()}.sock"


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8")


def error_message(kind: ErrorKind, text: str) -> dict[str, Any]:
    return {"error": text, "kind": kind.value}


CLIENT_GONE = object()  # in a connection's queue: its client closed the connection (or wrote to it)


class HandOff:
    """Pieces from the engines' threads to the socket server's loop, with one wake-up of the
    loop for all the pieces handed over since the last one, not one per piece: a decode step
    of 64 streams hands over 64 pieces at once, and each wake-up is a system call in the
    process that also runs vLLM's output handling. Each queue gets its pieces in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: deque = deque()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, event: Any) -> None:
        """From any thread."""
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, deque(), False
        for queue, event in pending:
            queue.put_nowait(event)


class StreamServer:
    """Serves `service.stream` (GeneratorService) on a Unix socket, on its own asyncio
    thread: the engines' threads hand pieces over through a HandOff, and a slow
    reader holds up only its own connection, never an engine."""

    def __init__(self, service, path: Path, describe: Callable[[BaseException, bool], tuple[ErrorKind, str]]):
        self.service = service
        self.path = path
        self.describe = describe  # generation.client_error: what a failed stream's client is told
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._streaming: set = set()  # handles of the answers being streamed (loop thread only)
        self._hand_off = HandOff(self._loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="stream-socket", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # a socket left by a server that was killed
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES), self._loop
        ).result(10)
        os.chmod(self.path, 0o600)  # this user's processes only
        log.info("streaming on %s", self.path)

    def stop(self, timeout_s: float = 5.0) -> None:
        async def close():
            if self._server is not None:
                self._server.close()
            for handle in list(self._streaming):  # the engines are about to go
                self.service.cancel(handle)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout_s)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handle = None
        gone: asyncio.Future | None = None
        try:
            try:
                request = json.loads(await reader.readline())
                item = generation_items([request["prompt_ids"]], {k: [v] for k, v in request["values"].items()})[0]
            except InvalidRequest as exc:
                writer.write(encode(error_message(ErrorKind.INVALID, str(exc))))
                return
            except (ValueError, KeyError, TypeError) as exc:  # not our client: say so and stop
                writer.write(encode(error_message(ErrorKind.INVALID, f"bad stream request: {exc}")))
                return
            pieces: asyncio.Queue = asyncio.Queue()
            handle = self.service.stream(item, lambda event: self._hand_off.put(pieces, event))
            if handle is not None:
                self._streaming.add(handle)
            gone = asyncio.ensure_future(reader.read(1))  # EOF: the client closed, abort

            def client_left(done: asyncio.Future) -> None:
                if not done.cancelled():
                    done.exception()  # a reset connection is only a client leaving: retrieved, not logged
                pieces.put_nowait(CLIENT_GONE)

            gone.add_done_callback(client_left)
            while True:
                # Every piece waiting goes out in one write: a connection that fell behind
                # catches up with one system call, not one per piece.
                events = [await pieces.get()]
                while not pieces.empty():
                    events.append(pieces.get_nowait())
                lines, ended = [], False
                for event in events:
                    if event is CLIENT_GONE:
                        if handle is not None:
                            log.info("stream %s: the client went away; aborting", handle.batch_id)
                            self.service.cancel(handle)
                        return
                    if isinstance(event, BaseException):
                        lines.append(encode(error_message(*self.describe(event, self.service.serving))))
                        ended = True
                        break
                    # The piece's own fields, as they are: asdict would deep-copy its logprobs.
                    lines.append(encode(vars(event)))
                    if event.finish_reason is not None:
                        ended = True
                        break
                writer.write(b"".join(lines))
                if ended:
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            if handle is not None:
                log.info("stream %s: connection lost (%s); aborting", handle.batch_id, exc)
                self.service.cancel(handle)
        finally:
            self._streaming.discard(handle)
            if gone is not None:
                gone.cancel()
            try:
                await writer.drain()
                writer.close()
            except ConnectionError:
                pass


class StreamFailed(Exception):
    """The server answered with an error of this kind."""

    def __init__(self, message: str, kind: ErrorKind):
        super().__init__(message)
        self.kind = kind


def merge_pieces(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """Pieces as one: the text, tokens, token ids and logprobs of all, in order, and the
    last one's finish reason."""
    if len(pieces) == 1:
        return pieces[0]
    logprobs = [entry for piece in pieces for entry in piece.get("logprobs") or ()]
    return {"text": "".join(piece["text"] for piece in pieces), "tokens": sum(piece["tokens"] for piece in pieces),
            "prompt_tokens": pieces[0]["prompt_tokens"], "finish_reason": pieces[-1].get("finish_reason"),
            "logprobs": logprobs if any(piece.get("logprobs") is not None for piece in pieces) else None,
            "token_ids": [i for piece in pieces for i in piece.get("token_ids") or ()]}


def stream_events(path: Path, prompt_ids: list[int], values: dict[str, Any],
                  stop_asked: Callable[[], bool], poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """The pieces of one answer from the server at `path`, as dicts (see the protocol
    above), until the one with a finish reason. Pieces that arrived together are yielded as
    one (merge_pieces): a reader that falls behind the engine catches up with fewer, larger
    pieces instead of a growing backlog, and nothing is lost. `stop_asked` is polled
    before each wait for more, and every `poll_s` while waiting: when it says yes the
    connection is closed (the server aborts the generation) and the iterator ends.
    StreamFailed for an error line (after the pieces before it); a server that is not there
    or goes away gives StreamFailed(UNAVAILABLE)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(str(path))
            conn.sendall(encode({"prompt_ids": prompt_ids, "values": values}))
        except OSError as exc:
            raise StreamFailed(f"the generator is not serving streams ({exc})", ErrorKind.UNAVAILABLE) from None
        conn.settimeout(poll_s)
        buffer = b""
        while True:
            lines, _, buffer = buffer.rpartition(b"\n")  # every complete line; the rest waits
            if lines:
                pieces = []
                for line in lines.split(b"\n"):
                    event = json.loads(line)  # a piece, or {"error", "kind"}
                    if "error" in event:
                        if pieces:
                            yield merge_pieces(pieces)
                        raise StreamFailed(event["error"], ErrorKind(event.get("kind", ErrorKind.INTERNAL.value)))
                    pieces.append(event)
                    if event.get("finish_reason") is not None:
                        break
                yield merge_pieces(pieces)
                if pieces[-1].get("finish_reason") is not None:
                    return
            if stop_asked():
                return
            try:
                chunk = conn.recv(65536)  # under glibc's mmap threshold: a bigger buffer costs an mmap per call
            except socket.timeout:
                continue
            except OSError as exc:
                raise StreamFailed(f"the generator's stream broke off ({exc})", ErrorKind.UNAVAILABLE) from None
            if not chunk:
                raise StreamFailed("the generator closed the stream before the answer ended", ErrorKind.UNAVAILABLE)
            buffer += chunk
