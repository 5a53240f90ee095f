"""The meta DB's SELECTs on MySQL/MariaDB, asked and answered on the proxy's event loop.

PyMySQL opens and authenticates the session (every auth plugin, charset and URL option it
supports, on a worker thread); then its socket is handed to asyncio and queries are written and
their text-protocol result sets parsed here. A search thus pays neither a worker-thread hop nor
PyMySQL's per-packet reads, and the loop never blocks on the DB. The session is in autocommit, so
every SELECT reads the latest committed rows: no snapshot outlives a statement. Statements are
pipelined: several may be outstanding on the one connection, answered in the order sent.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

# Column types (the type byte of a column definition) whose text value is an integer or a float.
_INTEGER_TYPES = frozenset({1, 2, 3, 8, 9, 13})  # TINY, SHORT, LONG, LONGLONG, INT24, YEAR
_FLOAT_TYPES = frozenset({4, 5})  # FLOAT, DOUBLE

_COM_QUERY = b"\x03"
_COM_QUIT = b"\x01\x00\x00\x00\x01"
_MAX_PAYLOAD = 0xFFFFFF  # a payload this long continues in the next packet
_STATUS_IN_TRANS = 0x0001
_STATUS_MORE_RESULTS = 0x0008
_CLIENT_DEPRECATE_EOF = 1 << 24

# Errors with which the server ends the session (killed, shutting down, idle too long): the
# statement never ran, and the connection is gone.
_SESSION_ENDED = frozenset({1053, 1927, 4031})

_HEAD, _COLUMNS, _COLUMNS_END, _ROWS = range(4)

Row = tuple[Any, ...]


class WireError(Exception):
    """The query got no result set."""


class ServerError(WireError):
    """The server answered the statement with an error; the connection stays usable."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"({code}) {message}")
        self.code = code


class ConnectionLost(WireError):
    """The connection closed (or was closed as unusable) before the answer came: a SELECT may be retried."""


class Unsupported(WireError):
    """The session cannot be taken over (TLS, or a driver that is not PyMySQL): use the driver itself."""


def open_session(connect: Callable[..., Any], args: tuple, params: dict, timeout: float) -> tuple[socket.socket, Any]:
    """Open an autocommit PyMySQL session (blocking: run it on a worker thread) and take its socket.

    Returns the socket and the PyMySQL connection object, which stays usable for quoting literals
    (`escape` knows the session's NO_BACKSLASH_ESCAPES state) but no longer owns the socket.
    """
    session = connect(
        *args,
        **{**params, "autocommit": True, "connect_timeout": timeout, "read_timeout": timeout, "write_timeout": timeout},
    )
    raw = getattr(session, "_sock", None)
    if type(raw) is not socket.socket or session.client_flag & _CLIENT_DEPRECATE_EOF or not session.get_autocommit():
        session.close()
        raise Unsupported("the meta DB session uses TLS or protocol options this reader does not parse")
    own = raw.dup()
    # Let go of PyMySQL's descriptor without COM_QUIT: the session lives on through `own`.
    session._force_close()
    if own.family in (socket.AF_INET, socket.AF_INET6):
        # An idle connection a firewall dropped without a FIN is found in ~1 min, not hours.
        for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                own.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return own, session


Converter = Callable[[bytes | bytearray], Any]  # a column's text to its Python value


def _length(payload: bytes | bytearray, pos: int) -> tuple[int, int]:
    """A length-encoded integer at `pos`: (value, position after it)."""
    first = payload[pos]
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFC:
        return payload[pos + 1] | payload[pos + 2] << 8, pos + 3
    if first == 0xFD:
        return payload[pos + 1] | payload[pos + 2] << 8 | payload[pos + 3] << 16, pos + 4
    if first == 0xFE:
        return int.from_bytes(payload[pos + 1 : pos + 9], "little"), pos + 9
    raise WireError(f"bad length-encoded integer 0x{first:02x}")


class MysqlChannel(asyncio.Protocol):
    """One MySQL session on the event loop: `query` sends a statement, returns a future of its rows."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reason = ""
        self._pending: deque[asyncio.Future[list[Row]]] = deque()
        self._buffer = bytearray()
        self._long: bytearray | None = None  # a payload of 16 MiB or more, still being joined
        self._state = _HEAD
        self._columns_left = 0
        self._converters: list[Converter] = []
        self._rows: list[Row] = []
        self._decode = lambda value: value.decode(encoding)
        self._known_columns: dict[bytes, Converter] = {}  # column definition -> converter

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ConnectionLost(self.reason or f"the meta DB closed the connection ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        # Rows, nearly every packet of an answer, are parsed right here; the rest goes to `_packet`.
        if self._buffer:
            self._buffer += data
            buffer: bytes | bytearray = self._buffer
        else:
            buffer = data
        pos, end = 0, len(buffer)
        rows, converters = self._rows, self._converters
        try:
            while end - pos >= 4:
                length = buffer[pos] | buffer[pos + 1] << 8 | buffer[pos + 2] << 16
                start = pos + 4
                stop = start + length
                if stop > end:
                    break
                pos = stop
                if self._state == _ROWS and 0 < length < _MAX_PAYLOAD and self._long is None:
                    first = buffer[start]
                    if first != 0xFE and first != 0xFF:  # not EOF, not ERR: a row
                        values: list[object] = []
                        at = start
                        for convert in converters:
                            size = buffer[at]
                            if size < 0xFB:
                                at += 1
                            elif size == 0xFB:
                                values.append(None)
                                at += 1
                                continue
                            else:
                                size, at = _length(buffer, at)
                            values.append(convert(buffer[at : at + size]))
                            at += size
                        rows.append(tuple(values))
                        continue
                payload = bytes(buffer[start:stop])
                if length == _MAX_PAYLOAD or self._long is not None:
                    self._long = (self._long or bytearray()) + payload
                    if length == _MAX_PAYLOAD:
                        continue
                    payload, self._long = bytes(self._long), None
                self._packet(payload)
                rows, converters = self._rows, self._converters
        except (WireError, IndexError, ValueError) as exc:  # out of step: nothing after this can be trusted
            self.abort(f"meta DB protocol error: {exc.__class__.__name__}: {exc}")
            return
        if pos == end:
            self._buffer = bytearray()
        else:
            self._buffer = bytearray(buffer[pos:])

    # ------------------------------------------------------------------ queries
    def query(self, sql: str) -> asyncio.Future[list[Row]]:
        """Send one statement; the future gets its rows, ServerError or ConnectionLost."""
        if self.closed or self.transport is None:
            raise ConnectionLost(self.reason or "the meta DB connection is closed")
        payload = _COM_QUERY + sql.encode(self.encoding)
        if len(payload) >= _MAX_PAYLOAD:
            raise WireError("statement too long")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        self.transport.write(len(payload).to_bytes(3, "little") + b"\x00" + payload)
        return future

    def close(self) -> None:
        """End the session politely (COM_QUIT), failing whatever is still outstanding."""
        if self.transport is not None and not self.closed:
            self.transport.write(_COM_QUIT)
            self.transport.close()
        self._fail_all(ConnectionLost(self.reason or "the meta DB connection was closed"))

    def abort(self, reason: str) -> None:
        """Drop the connection at once (no answer, broken stream): every outstanding query fails."""
        self.reason = self.reason or reason
        if self.transport is not None:
            self.transport.abort()
        self._fail_all(ConnectionLost(self.reason))

    def _fail_all(self, error: Exception) -> None:
        self.closed = True
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)

    # ------------------------------------------------------------------ result sets
    def _packet(self, payload: bytes) -> None:
        state = self._state
        first = payload[0] if payload else -1
        if state == _ROWS:
            if first == 0xFE and len(payload) < 9:  # EOF: the last row was sent
                status = payload[3] | payload[4] << 8 if len(payload) >= 5 else 0
                rows, self._rows = self._rows, []
                self._state = _HEAD
                self._answer(rows)
                if status & _STATUS_MORE_RESULTS:
                    raise WireError("a statement returned more than one result set")
                if status & _STATUS_IN_TRANS:
                    raise WireError("the session left autocommit (a transaction is open)")
            elif first == 0xFF:
                self._rows, self._state = [], _HEAD
                self._answer(self._server_error(payload))
            else:
                self._rows.append(self._row(payload))
        elif state == _HEAD:
            if first == 0xFF:
                self._answer(self._server_error(payload))
            elif first == 0x00:  # OK: a statement without a result set
                self._answer([])
            elif first == 0xFB or first < 0:
                raise WireError("unexpected answer to a query")
            else:
                self._columns_left, _ = _length(payload, 0)
                self._converters = []
                self._state = _COLUMNS
        elif state == _COLUMNS:
            self._converters.append(self._converter(payload))
            self._columns_left -= 1
            if self._columns_left == 0:
                self._state = _COLUMNS_END
        else:  # _COLUMNS_END
            if first != 0xFE or len(payload) >= 9:
                raise WireError("column definitions not followed by EOF")
            self._state = _ROWS

    def _answer(self, result: list[Row] | ServerError) -> None:
        if isinstance(result, ServerError) and result.code in _SESSION_ENDED:
            raise WireError(f"the server ended the session: {result}")
        if not self._pending:
            raise WireError("an answer nobody asked for")
        future = self._pending.popleft()
        if future.done():  # its caller gave up (timeout, cancellation): the answer is dropped
            return
        if isinstance(result, ServerError):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _server_error(self, payload: bytes) -> ServerError:
        code = payload[1] | payload[2] << 8 if len(payload) >= 3 else 0
        text = payload[9:] if payload[3:4] == b"#" else payload[3:]
        return ServerError(code, text.decode(self.encoding, "replace"))

    def _converter(self, definition: bytes) -> Converter:
        """The Python value of a column's text: int, float or str, by the column definition's type."""
        known = self._known_columns.get(definition)
        if known is not None:
            return known
        if len(self._known_columns) > 256:  # the reader asks a handful of statements: bounded anyway
            self._known_columns.clear()
        known = self._known_columns[definition] = self._parse_converter(definition)
        return known

    def _parse_converter(self, definition: bytes) -> Converter:
        pos = 0
        for _ in range(6):  # catalog, schema, table, org_table, name, org_name
            size, pos = _length(definition, pos)
            pos += size
        column_type = definition[pos + 7]  # after 0x0c, charset (2), display length (4)
        if column_type in _INTEGER_TYPES:
            return int
        if column_type in _FLOAT_TYPES:
            return float
        return self._decode

    def _row(self, payload: bytes) -> Row:
        values: list[object] = []
        pos = 0
        for convert in self._converters:
            first = payload[pos]
            if first == 0xFB:
                values.append(None)
                pos += 1
                continue
            if first < 0xFB:
                start = pos + 1
                pos = start + first
            else:
                size, start = _length(payload, pos)
                pos = start + size
            values.append(convert(payload[start:pos]))
        return tuple(values)
