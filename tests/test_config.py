import pytest

from llmserve.common.config import load_config


def test_defaults_listen_on_loopback_only():
    config = load_config(env={})
    for section in (config.gateway, config.scheduler, config.worker, config.registry):
        assert section.host == "127.0.0.1"
    assert config.gateway.port == 50051


def test_yaml_then_environment(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gateway:\n  port: 6000\nworker:\n  models: [a, b]\n")
    config = load_config(path, env={"LLMSERVE_GATEWAY__PORT": "7000", "LLMSERVE_LOG__JSON": "false"})
    assert config.gateway.port == 7000 and config.worker.models == ["a", "b"] and config.log.json is False


def test_gateway_replica_ports_from_yaml_and_environment(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gateway:\n  replica_ports: [7001, 7002]\n")
    assert load_config(path, env={}).gateway.replica_ports == [7001, 7002]
    assert load_config(path, env={"LLMSERVE_GATEWAY__REPLICA_PORTS": ""}).gateway.replica_ports == []
    assert load_config(env={"LLMSERVE_GATEWAY__REPLICA_PORTS": "7003, 7004"}).gateway.replica_ports == [7003, 7004]


@pytest.mark.parametrize("yaml_text, env, needle", [
    ("gateway:\n  prot: 1\n", {}, "gateway.prot: unknown setting"),
    ("nope: {}\n", {}, "unknown section"),
    ("", {"LLMSERVE_GATEWAY__PORT": "abc"}, "cannot read 'abc' as int"),
    ("", {"LLMSERVE_WORKER__MAX_NUM_SEQS": "0"}, "worker.max_num_seqs=0"),
    ("", {"LLMSERVE_GATEWAY__MAX_MESSAGES": "0"}, "gateway.max_messages=0 must be >= 1"),
    ("", {"LLMSERVE_GATEWAY__RESPONSE_CACHE_MAX_ENTRY_BYTES": "-1"}, "gateway.response_cache_max_entry_bytes=-1"),
    ("gateway:\n  port: 7000\n  replica_ports: [7001, 7000]\n", {}, "gateway.replica_ports=[7001, 7000] must be"),
    ("", {"LLMSERVE_GATEWAY__REPLICA_PORTS": "7001,x"}, "cannot read '7001,x' as list[int]"),
    ("", {"LLMSERVE_SCHEDULER__MAX_QUEUE_PER_CLASS": "1,2,3,4"}, "scheduler.max_queue_per_class=[1, 2, 3, 4]"),
    ("scheduler:\n  max_queue_per_class: [8, -1]\n", {}, "each >= 0"),
])
def test_bad_config_names_the_setting(tmp_path, yaml_text, env, needle):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=None) as err:
        load_config(path, env=env)
    assert needle in str(err.value)
