"""A verified certificate names one device: used for another (the wrong CN
for the client id, or readings of another device over https) it is refused
as not authorized, and nothing of the other device is stored."""
from __future__ import annotations

import json

from binaries import require
from security.pki import CA
from security.test_tls_listeners import TLSGateway, http_post_tls, mqtts_publish


def test_a_certificate_for_one_device_cannot_speak_for_another(tmp_path):
    mosquitto_pub = require("mosquitto_pub")
    ca = CA("rsa")
    meter1 = ca.issue(cn="meter-1", kind="rsa")
    gw = TLSGateway(tmp_path, ca=ca, client_certs=True, kind="rsa")
    try:
        cert, key = meter1.write(tmp_path, "meter-1")
        wrong = mqtts_publish(mosquitto_pub, gw, "meter-9", "--cert", cert, "--key", key)
        assert wrong.returncode != 0 and "not authori" in wrong.stderr.lower(), wrong.stderr
        right = mqtts_publish(mosquitto_pub, gw, "meter-1", "--cert", cert, "--key", key)
        assert right.returncode == 0, right.stderr
        batch = [{"device_id": "meter-1", "battery_mv": 3700}, {"device_id": "meter-9", "battery_mv": 3600}]
        answer = json.loads(http_post_tls(gw.proc.https[1], gw.client_context(meter1), json.dumps(batch).encode()))
        assert (answer["accepted"], answer["rejected"]) == (1, 1)
        assert answer["errors"][0]["reason"] == "not_authorized" and answer["errors"][0]["index"] == 1
        assert gw.proc.metric('gridgate_not_authorized_total{action="connect",protocol="mqtt"}') == 1
    finally:
        records = gw.stop_and_export()
    assert sorted(r["device_id"] for r in records) == ["meter-1", "meter-1"]
