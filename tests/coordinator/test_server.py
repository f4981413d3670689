"""The coordinator's HTTP server under arbitrary requests: an answer for each, and no request whose handler failed."""

import http.client
import string
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

KNOWN_PATHS = ["/", "/index.html", "/api/v1/state", "/api/v1/history", "/metrics", "/healthz", "/static/x", "/.."]
EXPECTED_STATUSES = {200, 400, 404, 414, 501}

paths = st.one_of(
    st.sampled_from(KNOWN_PATHS),
    st.builds(
        lambda prefix, text: prefix + quote(text, safe="/?=&%"),
        st.sampled_from(KNOWN_PATHS + [""]),
        st.text(max_size=80),
    ),
    st.text(alphabet=string.printable.strip(), max_size=200).map(lambda s: "/" + s.replace(" ", "")),
)
queries = st.one_of(
    st.just(""),
    st.builds(
        lambda v: "?since=" + quote(v),
        st.one_of(
            st.text(max_size=30),
            st.sampled_from(["nan", "inf", "-inf", "1e400", "-1", "0x10", ""]),
            st.floats(allow_nan=True).map(str),
        ),
    ),
    st.text(max_size=60).map(lambda s: "?" + quote(s, safe="=&")),
)
methods = st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])


def request(url: str, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, target, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_arbitrary_requests_get_an_answer_and_no_traceback(tmp_path, write_run_config, coordinator):
    coord = coordinator(write_run_config(tmp_path))
    state_files = {p.name for p in coord.state_dir.iterdir()}

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(method=methods, path=paths, query=queries, body=st.one_of(st.none(), st.binary(max_size=256)))
    def check(method, path, query, body):
        status, payload = request(coord.url, method, path + query, body)
        assert status in EXPECTED_STATUSES, (method, path + query, status)
        assert b"Traceback" not in payload

    check()
    assert request(coord.url, "GET", "/healthz") == (200, b"ok\n")
    assert request(coord.url, "GET", "/api/v1/history?since=nan")[0] == 200
    assert request(coord.url, "GET", "/api/v1/history?since=soon") == (400, b"since must be a number\n")
    assert {p.name for p in coord.state_dir.iterdir()} <= state_files | {"history.sqlite-journal"}
    _, metrics = request(coord.url, "GET", "/metrics")
    samples = {s.name: s.value for family in text_string_to_metric_families(metrics.decode()) for s in family.samples}
    assert samples["starling_coordinator_request_errors_total"] == 0
