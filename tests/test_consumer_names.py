"""
Consumer names and keys apart: a key typed where a consumer's name goes is
refused with what to do and never logged; a new consumer's name neither
starts as a key does (C{ock-}) nor with C{-} (an option to openclawctl).
A gateway in this process, its control plane over a real socket.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from openclaw.consumers.model import Consumer, NewKey, ctl_arguments
from openclaw.consumers.shared import SharedCounters
from openclaw.consumers.table import NotReleased, tpm_refused
from tests.test_consumers import GatewayCase


class KeyWhereANameGoesTests(GatewayCase):
    def logged(self) -> str:
        """
        Every log event so far, as its line and as its fields.
        """
        return "\n".join(formatEvent(event) + repr(event) for event in self.events)

    @inlineCallbacks
    def test_key_as_name_is_refused_and_never_logged(self) -> Any:
        """
        A consumer's key given as the name of every command that names a
        consumer: refused, the error naming the consumer the key is of and
        how to revoke it; the audit line names it as lists show keys
        (C{ock-} and 8 characters); neither the key nor more of it than
        that is in the log, or in the error.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "team"})
        key, prefix = created["key"], created["key_prefix"]
        for cmd, data in (
            ("consumer_list", {"name": key}),
            ("usage", {"name": key}),
            ("consumer_update", {"name": key, "rpm": 5}),
            ("consumer_delete", {"name": key}),
            ("key_create", {"name": key}),
            ("key_revoke", {"name": key, "key_prefix": prefix}),
        ):
            answer = yield client.ask(gateway.token, cmd, data)
            self.assertFalse(answer["ok"], (cmd, answer))
            self.assertIn("is a key of consumer 'team'", answer["error"])
            self.assertIn(f"openclawctl key revoke team {prefix}", answer["error"])
            self.assertNotIn(key[4:13], answer["error"])
            [audited] = [event for event in self.events if event.get("cmd") == cmd and "outcome" in event]
            self.assertEqual((audited["outcome"], audited["consumer"]), ("error", f"ock-{prefix}..."))
        unknown = NewKey.make().key
        answer = yield client.ask(gateway.token, "consumer_list", {"name": unknown})
        self.assertIn("neither a consumer's name nor a key of one: give the consumer's name", answer["error"])
        logged = self.logged()
        for secret in (key, unknown):
            self.assertNotIn(secret, logged)
            self.assertNotIn(secret[4:13], logged)
        # Nothing changed: the consumer and its one key.
        listed = yield self.command(gateway, client, "consumer_list", {"name": "team"})
        self.assertEqual(listed["consumers"][0]["keys"], [{"prefix": prefix}])

    @inlineCallbacks
    def test_key_in_an_error_is_cut_in_the_log(self) -> Any:
        """
        An error about what was sent (here a key given as C{since}) is
        recorded in the audit line without the key.
        """
        gateway, client = yield self.gateway()
        key = NewKey.make().key
        answer = yield client.ask(gateway.token, "usage", {"since": key})
        self.assertFalse(answer["ok"])
        [audited] = [event for event in self.events if event.get("cmd") == "usage" and "outcome" in event]
        # The value is not quoted at all now (it may be megabytes long).
        self.assertIn("since is not an ISO date", audited["error"])
        self.assertNotIn(key[4:13], audited["error"])
        self.assertNotIn(key[4:13], self.logged())

    @inlineCallbacks
    def test_ctl_says_what_to_do(self) -> Any:
        """
        openclawctl, as the trial that found it ran it: the key as the
        consumer to list; its error says whose key it is.
        """
        from tests.test_ctl import run_ctl

        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "team"})
        out, err, code = yield run_ctl(
            "--url", f"ws://127.0.0.1:{gateway.port}", "--token", gateway.token, "consumer", "list", created["key"]
        )
        self.assertEqual((out, code), ("", 1))
        self.assertIn("consumer_list failed: data.name is a key of consumer 'team'", err)
        self.assertNotIn(created["key"], self.logged())


class NewNameTests(GatewayCase):
    @inlineCallbacks
    def test_names_a_new_consumer_may_not_have(self) -> Any:
        """
        A new consumer's name may not start as keys do, nor with C{-}:
        refused, saying why; nothing is created.
        """
        gateway, client = yield self.gateway()
        for name, said in (
            ("ock-team", "may not start with ock-, as consumer keys do"),
            (NewKey.make().key, "may not start with ock-, as consumer keys do"),
            ("-team", "starts with '-', which openclawctl reads as an option"),
        ):
            answer = yield client.ask(gateway.token, "consumer_create", {"name": name})
            self.assertFalse(answer["ok"], answer)
            self.assertIn(said, answer["error"])
        listed = yield self.command(gateway, client, "consumer_list")
        self.assertEqual(listed["consumers"], [])

    @inlineCallbacks
    def test_names_made_before_still_addressed(self) -> Any:
        """
        Consumers an earlier version let be named C{-team} or C{ock-team}
        are still listed, changed and deleted by name.
        """
        gateway, client = yield self.gateway()
        for name in ("-team", "ock-team"):
            yield gateway.service.consumers.create(Consumer(name))
            listed = yield self.command(gateway, client, "consumer_list", {"name": name})
            self.assertEqual(listed["consumers"][0]["name"], name)
            updated = yield self.command(gateway, client, "consumer_update", {"name": name, "rpm": 5})
            self.assertEqual(updated["consumer"]["rpm"], 5)
            deleted = yield self.command(gateway, client, "consumer_delete", {"name": name})
            self.assertEqual(deleted["deleted"], name)

    @inlineCallbacks
    def test_revoke_hint_for_a_dashed_name_parses(self) -> Any:
        """
        The revoke command a key-as-name error gives, for a consumer an
        earlier version let be named C{-team}: C{--} before the name, so
        that openclawctl reads both as values.
        """
        from openclaw.ctl import parse_request

        gateway, client = yield self.gateway()
        yield gateway.service.consumers.create(Consumer("-team"))
        created = yield self.command(gateway, client, "key_create", {"name": "-team"})
        answer = yield client.ask(gateway.token, "consumer_list", {"name": created["key"]})
        hint = answer["error"].rsplit("to revoke that key: ", 1)[1]
        self.assertEqual(hint, f"openclawctl key revoke -- -team {created['key_prefix']}")
        request = parse_request(hint.split()[1:], {"OPENCLAW_TOKEN": gateway.token})
        self.assertEqual(
            (request.cmd, request.data), ("key_revoke", {"name": "-team", "key_prefix": created["key_prefix"]})
        )


class DashedNameHintsTests(TestCase):
    """
    The openclawctl commands messages name for a consumer an earlier
    version let be named C{-team} (L{ctl_arguments}): C{--} before it, so
    that openclawctl reads it as a value; a plain name as it is.
    """

    def test_arguments(self) -> None:
        self.assertEqual(ctl_arguments("team"), "team")
        self.assertEqual(ctl_arguments("-team"), "-- -team")
        self.assertEqual(ctl_arguments("team", "-x1"), "-- team -x1")
        self.assertEqual(ctl_arguments("team", "ock-x1"), "team ock-x1")

    def test_release_hint_of_a_cluster_refusal_parses(self) -> None:
        """
        A cluster's C{tokens_reserved} 429 names the release command.
        """
        from openclaw.ctl import parse_request

        refusal = tpm_refused("-team", 100, 10, 95, 2, cluster=True)
        hint = refusal.message.split("release them at once (", 1)[1].split(")", 1)[0]
        self.assertEqual(hint, "openclawctl consumer release -- -team")
        request = parse_request(hint.split()[1:], {"OPENCLAW_TOKEN": "t"})
        self.assertEqual((request.cmd, request.data), ("consumer_release", {"name": "-team"}))

    def test_list_hint_of_a_release_not_answered(self) -> None:
        """
        A release Redis did not answer says to see what is held first.
        """
        counters = SharedCounters(_Failing(), Clock(), 1.0)
        counters.up = True
        released = counters.release_held(Consumer("-team"), 10_000.0)
        failure = self.failureResultOf(released, NotReleased)
        self.assertIn("(openclawctl consumer list -- -team)", str(failure.value))


class _Failing:
    """
    A Redis whose every script fails.
    """

    def key(self, *parts: str) -> str:
        return ":".join(("openclaw", *parts))

    def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        return fail(ConnectionDone())

    def publish_consumer(self, instance: str, name: str) -> Deferred[Any]:
        return succeed(None)

    def revokes(self) -> Deferred[Any]:
        return succeed({})


class CaseAloneTests(GatewayCase):
    @inlineCallbacks
    def test_name_told_apart_by_case_alone_warned(self) -> Any:
        """
        Names are case-sensitive: a consumer created under a name another
        has but for case is made (both are used so), with a warning saying
        so, as a likely typo (trial s30); one of another name is not.
        """
        gateway, client = yield self.gateway()
        first = yield self.command(gateway, client, "consumer_create", {"name": "alpha"})
        self.assertNotIn("warning", first)
        second = yield self.command(gateway, client, "consumer_create", {"name": "Alpha"})
        self.assertEqual(second["consumer"]["name"], "Alpha")
        self.assertEqual(
            second["warning"],
            "consumer names are case-sensitive: 'Alpha' is another consumer than 'alpha' (delete one with "
            "consumer_delete if it is a typo)",
        )
        other = yield self.command(gateway, client, "consumer_create", {"name": "beta"})
        self.assertNotIn("warning", other)
