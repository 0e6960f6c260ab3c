"""flywheel sim speaking a plant protocol, from the command line."""

from __future__ import annotations

from flywheel.cli import main

from gateway import load_mapping


def test_sim_wants_one_plant_protocol(capsys):
    assert main(["sim", "--scenario", "tiny", "--serve-opcua", "4840", "--sparkplug", "--duration", "1h"]) == 2
    assert "choose one plant protocol" in capsys.readouterr().err
    assert main(["sim", "--scenario", "tiny", "--serve-opcua", "70000", "--duration", "1h"]) == 2
    assert "should be a TCP port" in capsys.readouterr().err


def test_sim_sparkplug_writes_the_mapping_a_gateway_reads(broker, tmp_path, capsys):
    out, mapping = tmp_path / "plant.jsonl", tmp_path / "sp.yaml"
    assert main(["sim", "--scenario", "tiny", "--sparkplug", "--sparkplug-group", "gw-cli", "--duration", "30m",
                 "--broker", broker.url, "--write-mapping", str(mapping), "--out", str(out), "--seed", "4"]) == 0
    text = capsys.readouterr().out
    assert "120 samples exposed (0 lost)" in text           # 4 machines x 30 ticks
    m = load_mapping(mapping)
    assert m.protocol == "sparkplug" and m.group == "gw-cli" and m.seed == 4 and len(m.machines) == 4
    assert mapping.read_text().startswith(f"# flywheel gateway --mapping {mapping}")
    assert sum(1 for line in out.read_text().splitlines() if '/telemetry"' in line) == 120


def test_a_gateway_whose_broker_is_not_there_says_what_to_do(broker, tmp_path, capsys, free_port):
    mapping = tmp_path / "sp.yaml"
    assert main(["sim", "--scenario", "tiny", "--sparkplug", "--duration", "1m", "--broker", broker.url,
                 "--write-mapping", str(mapping)]) == 0
    capsys.readouterr()
    assert main(["gateway", "--mapping", str(mapping), "--broker", f"mqtt://127.0.0.1:{free_port}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flywheel gateway: cannot reach broker mqtt://127.0.0.1:{free_port}: [Errno 111] Connection "
                   "refused; start it (`flywheel broker` runs one) or check --broker"]
