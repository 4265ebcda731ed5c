"""The build hook compiled proto/fedhl/v1 into importable modules with unchanged imports."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_agent_service_has_every_rpc() -> None:
    from fedhl.v1 import agent_pb2, agent_pb2_grpc

    service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
    assert set(service.methods_by_name) == {
        "Register",
        "Heartbeat",
        "PullTask",
        "DownloadBlob",
        "UploadUpdate",
        "UploadStatus",
        "ReportMetrics",
    }
    assert service.methods_by_name["DownloadBlob"].server_streaming
    assert service.methods_by_name["UploadUpdate"].client_streaming
    assert hasattr(agent_pb2_grpc, "AgentServiceServicer")


def test_every_proto_has_its_generated_module() -> None:
    for proto in (ROOT / "proto").rglob("*.proto"):
        rel = proto.relative_to(ROOT / "proto").with_suffix("")
        assert (ROOT / "services" / f"{rel}_pb2.py").exists(), f"{proto} was not compiled"


def test_generated_code_is_not_post_processed() -> None:
    grpc_mod = (ROOT / "services/fedhl/v1/agent_pb2_grpc.py").read_text()
    assert "from fedhl.v1 import agent_pb2" in grpc_mod
