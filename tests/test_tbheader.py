"""Tests for :mod:`tigertunnel.wire.tbheader` (the TB 0.17 header fields tigertunnel reports)."""

import ast
import os
from collections import Counter
from typing import Tuple

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests import tbdata
from tigertunnel.errors import FrameError
from tigertunnel.wire import tbheader
from tigertunnel.wire.tbheader import (TBHeader, command_name, eviction_reason_name,
                                       operation_name, parse_header)

TRACES = ("tb-0.17.8-single", "tb-0.17.8-cluster3")


class LayoutTests(SynchronousTestCase):
    """The offsets match TB's struct layout, field by field."""

    def test_offsets_match_struct_layout(self) -> None:
        """Every offset the module reads is where TB 0.17.8's extern structs put the field."""
        self.assertEqual(tbheader.CLUSTER_OFFSET, tbdata.offset(tbdata.COMMON, "cluster"))
        self.assertEqual(tbheader.SIZE_OFFSET, tbdata.offset(tbdata.COMMON, "size"))
        self.assertEqual(tbheader.VIEW_OFFSET, tbdata.offset(tbdata.COMMON, "view"))
        self.assertEqual(tbheader.COMMAND_OFFSET, tbdata.offset(tbdata.COMMON, "command"))
        self.assertEqual(tbheader.REPLICA_OFFSET, tbdata.offset(tbdata.COMMON, "replica"))
        self.assertEqual(tbheader.REQUEST_CLIENT_OFFSET, tbdata.offset(tbdata.REQUEST, "client"))
        self.assertEqual(tbheader.REPLY_CLIENT_OFFSET, tbdata.offset(tbdata.REPLY, "client"))
        self.assertEqual(tbheader.EVICTION_CLIENT_OFFSET, tbdata.offset(tbdata.EVICTION, "client"))
        self.assertEqual(tbheader.EVICTION_REASON_OFFSET, tbdata.offset(tbdata.EVICTION, "reason"))

    def test_request(self) -> None:
        """A request header yields its client, request number, operation and common fields."""
        client = (0xDEADBEEF << 64) | 0x1234
        raw = tbdata.request(client, 77, 147, cluster=(1 << 127) + 5, view=3,
                             replica=2, session=9, timestamp=11, size=1000,
                             previous_request_latency=0xFFFFFFFF)
        self.assertEqual(parse_header(raw), TBHeader(
            command=5, cluster=(1 << 127) + 5, size=1000, view=3, replica=2,
            client=client, request=77, operation=147))
        self.assertEqual(parse_header(raw).operation_name, "create_transfers")

    def test_reply(self) -> None:
        """A reply header yields its client, request number, operation and view."""
        client = (1 << 128) - 1
        raw = tbdata.reply(client, 0xFFFFFFFF, 2, view=0xFFFFFFFF, replica=1,
                           op=5, commit=5, timestamp=1 << 63, size=288)
        header = parse_header(raw)
        self.assertEqual(header, TBHeader(
            command=8, cluster=0, size=288, view=0xFFFFFFFF, replica=1,
            client=client, request=0xFFFFFFFF, operation=2))
        self.assertEqual((header.command_name, header.operation_name, header.reason_name),
                         ("reply", "register", None))

    def test_eviction(self) -> None:
        """An eviction header yields its client and reason."""
        header = parse_header(tbdata.eviction(12345, 7, replica=2))
        self.assertEqual((header.client, header.reason, header.reason_name, header.replica,
                          header.request, header.operation),
                         (12345, 7, "session_too_low", 2, None, None))

    def test_other_commands(self) -> None:
        """Other commands yield only the common fields."""
        raw = tbdata.build(tbdata.COMMIT, command=tbdata.COMMAND["commit"], view=4,
                           replica=1, size=256, cluster=3)
        self.assertEqual(parse_header(raw), TBHeader(9, 3, 256, 4, 1))

    def test_frame_longer_than_header(self) -> None:
        """A whole frame (header and body) or a memoryview of it parses like its header."""
        raw = tbdata.request(5, 1, 140, size=300) + bytes(44)
        self.assertEqual(parse_header(memoryview(raw)), parse_header(raw[:256]))

    def test_short_header(self) -> None:
        """Fewer than 256 bytes are a FrameError naming the length."""
        error = self.assertRaises(FrameError, parse_header, bytes(255))
        self.assertIn("255 bytes", str(error))


class NameTests(SynchronousTestCase):
    """Commands, operations and reasons get TB's names, unknown numbers a fixed form."""

    def test_known_names(self) -> None:
        """TB 0.17.8's numbers map to its names."""
        self.assertEqual([command_name(n) for n in (1, 5, 6, 8, 9, 13, 18, 24)],
                         ["ping", "request", "prepare", "reply", "commit", "get_view",
                          "eviction", "view"])
        self.assertEqual([operation_name(n) for n in (2, 4, 128, 140, 141, 146, 147)],
                         ["register", "pulse", "pulse", "lookup_accounts",
                          "lookup_transfers", "create_accounts", "create_transfers"])
        self.assertEqual(eviction_reason_name(1), "no_session")

    def test_unknown_names(self) -> None:
        """Numbers TB 0.17.8 does not define are named cmd_<n>, op_<n>, reason_<n>."""
        self.assertEqual(command_name(25), "cmd_25")
        self.assertEqual(operation_name(7), "op_7")
        self.assertEqual(operation_name(255), "op_255")
        self.assertEqual(eviction_reason_name(9), "reason_9")

    def test_not_a_u8(self) -> None:
        """A value outside 0..255 is a FrameError naming it."""
        for function, value in ((command_name, 256), (operation_name, -1),
                                (eviction_reason_name, 1000)):
            error = self.assertRaises(FrameError, function, value)
            self.assertIn(str(value), str(error))

    def test_tables_cover_every_byte(self) -> None:
        """Each name table has one distinct-enough name for each of the 256 values."""
        for table in (tbheader.COMMAND_NAMES, tbheader.OPERATION_NAMES,
                      tbheader.EVICTION_REASON_NAMES):
            self.assertEqual(len(table), 256)
        self.assertEqual(len(set(tbheader.COMMAND_NAMES)), 256)


class TraceTests(SynchronousTestCase):
    """The layout reads the real TB 0.17.8 traces as their recorder decoded them."""

    def test_commands_and_sizes(self) -> None:
        """Each frame's command, size, view, replica and cluster match the recorder's decoding."""
        for trace in TRACES:
            for rec in tbdata.trace_records(trace):
                header = parse_header(rec["data"])
                self.assertEqual(
                    (header.command_name, header.command, header.size, header.view,
                     header.replica, header.cluster),
                    (rec["command_name"], rec["command"], len(rec["data"]), rec["view"],
                     rec["replica"], rec["cluster"]))

    def test_operations_match_recorder(self) -> None:
        """Each request's and reply's operation matches the recorder's decoding."""
        for trace in TRACES:
            for rec in tbdata.trace_records(trace):
                header = parse_header(rec["data"])
                if header.command in (tbheader.REQUEST, tbheader.REPLY):
                    self.assertEqual((header.operation, header.operation_name),
                                     (rec["operation"], rec["operation_name"]))

    def test_counts_match_summary(self) -> None:
        """Frames per command and per request/reply operation equal the trace summaries' counts."""
        for trace in TRACES:
            stated = tbdata.summary(trace)
            commands: "Counter[Tuple[str, ...]]" = Counter()
            operations: "Counter[Tuple[str, ...]]" = Counter()
            for rec in tbdata.trace_records(trace):
                header = parse_header(rec["data"])
                commands[(header.command_name,)] += 1
                if header.operation_name is not None:
                    operations[(header.command_name, header.operation_name)] += 1
            self.assertEqual(dict(commands), stated["command"])
            self.assertEqual(dict(operations), {k: v for k, v in stated["command/operation"].items()
                                                if k[0] in ("request", "reply")})

    def test_request_reply_pairs(self) -> None:
        """In the single-replica trace each request is followed by the reply with its client and number."""
        frames = [parse_header(r["data"]) for r in tbdata.trace_records("tb-0.17.8-single")]
        requests = [f for f in frames if f.command_name == "request"]
        replies = [f for f in frames if f.command_name == "reply"]
        self.assertEqual(len(requests), 7)
        self.assertEqual([(r.client, r.request, r.operation) for r in requests],
                         [(r.client, r.request, r.operation) for r in replies])
        self.assertEqual([r.request for r in requests], list(range(7)))


class FuzzTests(SynchronousTestCase):
    """Arbitrary bytes never make the parser raise anything but our own errors."""

    @given(st.binary(min_size=256, max_size=300))
    def test_any_header_parses(self, raw: bytes) -> None:
        """Any 256 or more bytes parse into a header with named command, operation, reason."""
        header = parse_header(raw)
        self.assertEqual(header.command, raw[114])
        self.assertTrue(header.command_name)
        self.assertEqual(header.operation is None, header.command not in (5, 8))
        self.assertEqual(header.reason is None, header.command != 18)
        for name in (header.operation_name, header.reason_name):
            self.assertTrue(name is None or name)

    @given(st.binary(max_size=255))
    def test_short_is_frame_error(self, raw: bytes) -> None:
        """Fewer than 256 bytes are always a FrameError."""
        self.assertRaises(FrameError, parse_header, raw)


class LayeringTests(SynchronousTestCase):
    """The sans-IO modules stay free of the reactor."""

    def test_no_twisted_imports(self) -> None:
        """tbheader and tbwatch import nothing from Twisted."""
        wire = os.path.dirname(tbheader.__file__)
        for module in ("tbheader.py", "tbwatch.py"):
            with open(os.path.join(wire, module)) as f:
                tree = ast.parse(f.read())
            imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for alias in node.names]
            imported += [node.module or "" for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom)]
            self.assertEqual([name for name in imported if name.startswith("twisted")], [],
                             module)
