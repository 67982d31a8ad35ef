"""One radiograph through a running pneumoscan: wait for /readyz, POST /predict, GET its
overlay, and check that /models serves on LiteRT. Standard library only, so the container check
runs it with the host's Python and the serving-install check with its venv's.

    python .ci/smoke.py URL KEY IMAGE --tag container [--multipart] [--label PNEUMONIA]
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
import uuid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("image")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--multipart", action="store_true", help="else the bytes as the body")
    parser.add_argument("--label", help="the label the image must get")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for /readyz")
    args = parser.parse_args()
    started = time.monotonic()
    while True:
        try:
            if urllib.request.urlopen(f"{args.url}/readyz", timeout=2).status == 200:
                break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - started > args.wait:
            raise SystemExit(f"[{args.tag}] not ready after {args.wait:.0f} s")
        time.sleep(0.2)
    ready_s = time.monotonic() - started
    data = open(args.image, "rb").read()
    if args.multipart:
        boundary = uuid.uuid4().hex
        body = (
            (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="file"; filename="x.jpeg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        content_type = f"multipart/form-data; boundary={boundary}"
    else:
        body, content_type = data, "image/jpeg"
    predict = urllib.request.Request(
        f"{args.url}/predict",
        data=body,
        headers={"Content-Type": content_type, "X-API-Key": args.key},
    )
    result = json.load(urllib.request.urlopen(predict, timeout=60))
    assert result["label"] in ("NORMAL", "PNEUMONIA"), result
    assert args.label is None or result["label"] == args.label, result
    overlay = urllib.request.Request(
        f"{args.url}{result['explain_url']}", headers={"X-API-Key": args.key}
    )
    png = urllib.request.urlopen(overlay, timeout=120).read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:16]
    models = urllib.request.Request(
        f"{args.url}/models", headers={"Authorization": f"Bearer {args.key}"}
    )
    served = json.load(urllib.request.urlopen(models, timeout=30))
    assert served["runtime"] == "tflite", served["runtime"]
    print(
        f"[{args.tag}] ready in {ready_s:.1f} s; v{served['serving']} on {served['runtime']}: "
        f"{result['label']} {result['probabilities']['PNEUMONIA']:.4f}; overlay {len(png)} bytes"
    )


if __name__ == "__main__":
    main()
