//! Thin ttrpc handlers: trace, call the sandbox, map the error to its code.

use std::sync::Arc;

use async_trait::async_trait;
use husk_proto::{agent as pb, agent_ttrpc, health, health_ttrpc};
use ttrpc::asynchronous::TtrpcContext;

use crate::{error::AgentError, sandbox::Sandbox};

type RpcResult<T> = ttrpc::Result<T>;

/// What the agent does once the sandbox is destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDestroy {
    /// Keep serving (host-process mode).
    KeepRunning,
    /// Power the VM off after answering (PID 1 in the guest).
    PowerOff,
}

/// The agent and health services.
#[derive(Debug, Clone)]
pub struct AgentService {
    pub sandbox: Arc<Sandbox>,
    pub on_destroy: OnDestroy,
    /// Whether the VM is a template waiting to be restored (sandbox, container and network
    /// requests wait for `Restored`).
    pub template: Arc<crate::template::TemplateGate>,
}

fn log_err<T>(rpc: &str, r: Result<T, AgentError>) -> RpcResult<T> {
    r.map_err(|e| {
        tracing::info!(rpc, code = ?e.code(), "{e}");
        e.into()
    })
}

#[async_trait]
impl health_ttrpc::Health for AgentService {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> RpcResult<health::CheckResponse> {
        let mut r = health::CheckResponse::new();
        r.status = health::check_response::Status::SERVING.into();
        Ok(r)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: health::VersionRequest,
    ) -> RpcResult<health::VersionResponse> {
        let mut r = health::VersionResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        r.api_version = husk_proto::API_VERSION;
        Ok(r)
    }
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn prepare_template(&self, _ctx: &TtrpcContext, _req: pb::Empty) -> RpcResult<pb::Empty> {
        self.template.prepare();
        Ok(pb::Empty::new())
    }

    async fn restored(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RestoredRequest,
    ) -> RpcResult<pb::RestoredResponse> {
        let in_guest = self.on_destroy == OnDestroy::PowerOff;
        let offset = log_err(
            "restored",
            self.template
                .restored(&req.entropy, req.unix_time_ns, in_guest),
        )?;
        let mut r = pb::RestoredResponse::new();
        r.clock_offset_ns = offset;
        Ok(r)
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ConfigureNetworkRequest,
    ) -> RpcResult<pb::Empty> {
        log_err(
            "configure_network",
            self.template.check("configure_network"),
        )?;
        tracing::info!(mac = %req.mac, "configure_network");
        let r = async {
            let plan = crate::network::Plan::parse(&req)?;
            crate::network::configure(&plan).await?;
            Ok(())
        }
        .await;
        log_err("configure_network", r)?;
        Ok(pb::Empty::new())
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> RpcResult<pb::Empty> {
        log_err("create_sandbox", self.template.check("create_sandbox"))?;
        tracing::info!(sandbox = %req.sandbox_id, "create_sandbox");
        let set_hostname = self.on_destroy == OnDestroy::PowerOff;
        log_err(
            "create_sandbox",
            self.sandbox.create_sandbox(
                &req.sandbox_id,
                &req.hostname,
                &req.sysctls,
                &req.shared_fs_tag,
                set_hostname,
            ),
        )?;
        Ok(pb::Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: pb::DestroySandboxRequest,
    ) -> RpcResult<pb::Empty> {
        tracing::info!(sandbox = %req.sandbox_id, "destroy_sandbox");
        log_err(
            "destroy_sandbox",
            self.sandbox.destroy_sandbox(&req.sandbox_id).await,
        )?;
        if self.on_destroy == OnDestroy::PowerOff {
            tokio::spawn(async {
                // Let the answer reach the host first.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                crate::pid1::power_off();
            });
        }
        Ok(pb::Empty::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> RpcResult<pb::CreateContainerResponse> {
        log_err("create_container", self.template.check("create_container"))?;
        tracing::info!(container = %req.container_id, "create_container");
        let pid = log_err("create_container", self.sandbox.create_container(req).await)?;
        let mut r = pb::CreateContainerResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StartContainerRequest,
    ) -> RpcResult<pb::StartContainerResponse> {
        tracing::info!(container = %req.container_id, "start_container");
        let pid = log_err(
            "start_container",
            self.sandbox.start_container(&req.container_id).await,
        )?;
        let mut r = pb::StartContainerResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> RpcResult<pb::Empty> {
        tracing::info!(container = %req.container_id, "remove_container");
        log_err(
            "remove_container",
            self.sandbox.remove_container(&req.container_id).await,
        )?;
        Ok(pb::Empty::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> RpcResult<pb::Empty> {
        tracing::info!(container = %req.container_id, "update_container");
        log_err("update_container", self.sandbox.update_container(req).await)?;
        Ok(pb::Empty::new())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::PauseContainerRequest,
    ) -> RpcResult<pb::Empty> {
        tracing::info!(container = %req.container_id, "pause_container");
        log_err(
            "pause_container",
            self.sandbox.pause_container(&req.container_id, true).await,
        )?;
        Ok(pb::Empty::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ResumeContainerRequest,
    ) -> RpcResult<pb::Empty> {
        tracing::info!(container = %req.container_id, "resume_container");
        log_err(
            "resume_container",
            self.sandbox.pause_container(&req.container_id, false).await,
        )?;
        Ok(pb::Empty::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ListProcessesRequest,
    ) -> RpcResult<pb::ListProcessesResponse> {
        tracing::debug!(container = %req.container_id, "list_processes");
        let pids = log_err(
            "list_processes",
            self.sandbox.list_processes(&req.container_id).await,
        )?;
        let mut r = pb::ListProcessesResponse::new();
        r.pids = pids;
        Ok(r)
    }

    async fn container_stats(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerStatsRequest,
    ) -> RpcResult<pb::ContainerStatsResponse> {
        tracing::debug!(container = %req.container_id, "container_stats");
        log_err(
            "container_stats",
            self.sandbox.container_stats(&req.container_id).await,
        )
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> RpcResult<pb::ExecProcessResponse> {
        log_err("exec_process", self.template.check("exec_process"))?;
        tracing::info!(container = %req.container_id, exec = %req.exec_id, "exec_process");
        let pid = log_err("exec_process", self.sandbox.exec_process(req).await)?;
        let mut r = pb::ExecProcessResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> RpcResult<pb::Empty> {
        tracing::info!(container = %req.container_id, exec = %req.exec_id, signal = req.signal, all = req.all, "signal_process");
        log_err("signal_process", self.sandbox.signal_process(req).await)?;
        Ok(pb::Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> RpcResult<pb::WaitProcessResponse> {
        tracing::debug!(container = %req.container_id, exec = %req.exec_id, "wait_process");
        log_err("wait_process", self.sandbox.wait_process(req).await)
    }

    async fn resize_terminal(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ResizeTerminalRequest,
    ) -> RpcResult<pb::Empty> {
        tracing::debug!(container = %req.container_id, exec = %req.exec_id, "resize_terminal");
        log_err("resize_terminal", self.sandbox.resize_terminal(&req))?;
        Ok(pb::Empty::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CloseStdinRequest,
    ) -> RpcResult<pb::Empty> {
        tracing::debug!(container = %req.container_id, exec = %req.exec_id, "close_stdin");
        log_err("close_stdin", self.sandbox.close_stdin(&req))?;
        Ok(pb::Empty::new())
    }

    async fn remove_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveProcessRequest,
    ) -> RpcResult<pb::Empty> {
        tracing::debug!(container = %req.container_id, exec = %req.exec_id, "remove_process");
        log_err("remove_process", self.sandbox.remove_process(&req))?;
        Ok(pb::Empty::new())
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::GetOomEventRequest,
    ) -> RpcResult<pb::OomEvent> {
        let id = log_err("get_oom_event", self.sandbox.next_oom_event().await)?;
        let mut r = pb::OomEvent::new();
        r.container_id = id;
        Ok(r)
    }
}
