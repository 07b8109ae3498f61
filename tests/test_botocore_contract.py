"""The botocore internals sigproxy relies on, each exercised by name, so that a botocore
release that changes one fails here (one named test) instead of in production.

pyproject.toml pins botocore to the range these pass on. Used:
  * ``SigV4Auth._modify_request_before_signing`` and ``._inject_signature_to_request``
    (sigproxy.botocore_signer runs botocore's ``add_auth`` steps with the time of its own
    clock, which corrects for clock skew);
  * ``RefreshableCredentials._expiry_time`` (sigproxy.credentials reads the expiry);
  * ``ProcessProvider._popen`` (sigproxy.credentials bounds a credential_process in time).
"""

from __future__ import annotations

import datetime
import hashlib
import inspect

from botocore.auth import SigV4Auth
from botocore.credentials import DeferredRefreshableCredentials, ReadOnlyCredentials

from sigproxy.botocore_signer import BotocoreSigner
from sigproxy.credentials import CredentialSource
from sigproxy.signing import Signer


def test_add_auth_is_still_the_steps_sigproxy_repeats() -> None:
    steps = inspect.getsource(SigV4Auth.add_auth)
    for name in (
        "request.context['timestamp']",
        "self._modify_request_before_signing(request)",
        "self.canonical_request(request)",
        "self.string_to_sign(request, canonical_request)",
        "self.signature(string_to_sign, request)",
        "self._inject_signature_to_request(request, signature)",
    ):
        assert name in steps, name


def test_botocore_signer_signs_at_the_corrected_time() -> None:
    host, region, service = "x.lambda-url.eu-west-1.on.aws", "eu-west-1", "lambda"
    creds = ReadOnlyCredentials("AKIDCONTRACT00000001", "contract-secret", None)
    digest = hashlib.sha256(b"").hexdigest()
    signer = BotocoreSigner(host, region, service)
    signer.clock.offset = -3600.0
    headers = signer.sign("GET", "/fn", digest, creds)
    stamp = dict(headers)["X-Amz-Date"]
    when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    hour_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    assert abs((when - hour_ago).total_seconds()) < 5
    # botocore's canonical request and signature for that time: the builtin signer's.
    assert Signer(host, region, service).sign_at("GET", "/fn", digest, creds, stamp) == headers


def test_refreshable_credentials_keep_their_expiry_where_sigproxy_reads_it() -> None:
    expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)

    def issue() -> dict[str, str]:
        return {
            "access_key": "ASIACONTRACT00000001",
            "secret_key": "contract-secret",
            "token": "contract-token",
            "expiry_time": expiry.isoformat(),
        }

    source = CredentialSource(
        DeferredRefreshableCredentials(refresh_using=issue, method="contract"), "contract"
    )
    source.load()
    assert source.expiry is not None
    assert abs(source.expiry - expiry.timestamp()) < 1


def test_credential_process_provider_takes_its_popen_where_sigproxy_sets_it() -> None:
    import botocore.session

    session = botocore.session.Session()
    provider = session.get_component("credential_provider").get_provider("custom-process")
    assert provider._popen is not None
    assert "self._popen(" in inspect.getsource(type(provider)._retrieve_credentials_using)
