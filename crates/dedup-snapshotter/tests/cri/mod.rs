//! A Kubernetes CRI client for the end-to-end tests: what the kubelet asks of
//! containerd's CRI plugin (PullImage, RunPodSandbox, CreateContainer,
//! StartContainer, ContainerStatus), over containerd's own socket.
//!
//! Pods use the host's network namespace (and so its hostname, as the kubelet does for
//! hostNetwork pods), so no CNI plugin is needed.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// The namespace containerd's CRI plugin keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// A blocking CRI client.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// A running pod sandbox and its config (CreateContainer needs both).
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    pub log_dir: PathBuf,
}

impl Cri {
    /// Connects to the CRI service on containerd's socket and checks it answers.
    pub fn connect(socket: &str) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt
            .block_on(containerd_client::connect(socket))
            .unwrap_or_else(|e| panic!("connecting to {socket}: {e}"));
        let mut c = Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        };
        let v =
            c.rt.block_on(c.runtime.version(cri::VersionRequest { version: "v1".into() }))
                .unwrap_or_else(|s| panic!("CRI Version on {socket}: {s}"))
                .into_inner();
        eprintln!(
            "cri: {} {} (CRI {})",
            v.runtime_name, v.runtime_version, v.runtime_api_version
        );
        c
    }

    /// PullImage; returns the image ref (its config digest) CRI answers.
    pub fn pull(&mut self, image: &str) -> String {
        let req = cri::PullImageRequest {
            image: Some(spec(image)),
            ..Default::default()
        };
        self.rt
            .block_on(self.images.pull_image(req))
            .unwrap_or_else(|s| panic!("CRI PullImage {image}: {s}"))
            .into_inner()
            .image_ref
    }

    /// RemoveImage (by the name it was pulled as).
    pub fn remove_image(&mut self, image: &str) {
        let req = cri::RemoveImageRequest {
            image: Some(spec(image)),
        };
        self.rt
            .block_on(self.images.remove_image(req))
            .unwrap_or_else(|s| panic!("CRI RemoveImage {image}: {s}"));
    }

    /// RunPodSandbox in the host's network namespace; logs under `log_dir`.
    pub fn run_pod(&mut self, name: &str, log_dir: &Path) -> Pod {
        std::fs::create_dir_all(log_dir).unwrap();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "e2e".into(),
                attempt: 0,
            }),
            log_directory: log_dir.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Pod as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let id = self
            .rt
            .block_on(self.runtime.run_pod_sandbox(req))
            .unwrap_or_else(|s| panic!("CRI RunPodSandbox {name}: {s}"))
            .into_inner()
            .pod_sandbox_id;
        Pod {
            id,
            config,
            log_dir: log_dir.to_path_buf(),
        }
    }

    /// CreateContainer + StartContainer of `image` running `command` in `pod`; returns its id.
    pub fn start_container(&mut self, pod: &Pod, name: &str, image: &str, command: &[&str]) -> String {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(spec(image)),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let id = self
            .rt
            .block_on(self.runtime.create_container(req))
            .unwrap_or_else(|s| panic!("CRI CreateContainer {name}: {s}"))
            .into_inner()
            .container_id;
        self.rt
            .block_on(self.runtime.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }))
            .unwrap_or_else(|s| panic!("CRI StartContainer {name}: {s}"));
        id
    }

    /// Waits for the container to exit; returns its exit code.
    pub fn wait_exit(&mut self, id: &str, timeout: Duration) -> i32 {
        let t = Instant::now();
        loop {
            let st = self
                .rt
                .block_on(self.runtime.container_status(cri::ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                }))
                .unwrap_or_else(|s| panic!("CRI ContainerStatus {id}: {s}"))
                .into_inner()
                .status
                .expect("a status");
            if st.state == cri::ContainerState::ContainerExited as i32 {
                return st.exit_code;
            }
            assert!(
                t.elapsed() < timeout,
                "container {id} still runs after {timeout:?}: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the container wrote to stdout and stderr, from CRI's log file
    /// (`TIME STREAM TAG MESSAGE` lines).
    pub fn logs(pod: &Pod, name: &str) -> String {
        let text = std::fs::read_to_string(pod.log_dir.join(format!("{name}.log"))).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .map(|m| format!("{m}\n"))
            .collect()
    }

    /// Removes an exited container.
    pub fn remove_container(&mut self, id: &str) {
        self.rt
            .block_on(self.runtime.remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            }))
            .unwrap_or_else(|s| panic!("CRI RemoveContainer {id}: {s}"));
    }

    /// Stops and removes the pod with its containers.
    pub fn remove_pod(&mut self, pod: &Pod) {
        self.rt
            .block_on(self.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }))
            .unwrap_or_else(|s| panic!("CRI StopPodSandbox: {s}"));
        self.rt
            .block_on(self.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }))
            .unwrap_or_else(|s| panic!("CRI RemovePodSandbox: {s}"));
    }
}

fn spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}
