//! The local cluster works as every later tier needs: two Ready nodes, pods on both
//! that share an emptyDir and reach each other, CRIU under the runtime (the kubelet
//! checkpoint API), and a real S3 server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, LogParams, PostParams};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, WriteMultipart};
use serde_json::json;

const BUSYBOX: &str = "cryopod.local/busybox:e2e";

fn pod(name: &str, node: &str, containers: serde_json::Value, volumes: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"cryopod.io/e2e-pod": name}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": containers,
            "volumes": volumes,
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn every_node_is_ready_the_vm_too() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let nodes: Api<Node> = Api::all(client);
    let list = nodes.list(&ListParams::default()).await.unwrap();
    let mut ready: Vec<String> = list
        .items
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|n| n.metadata.name.clone().unwrap_or_default())
        .collect();
    ready.sort();
    let vms: Vec<String> = cryopod_e2e::vm::VmNode::all(&tb)
        .unwrap()
        .into_iter()
        .map(|vm| vm.name)
        .collect();
    let mut all = [tb.nodes.clone(), vms].concat();
    all.sort();
    assert_eq!(ready, all, "every node of the testbed is Ready, the VM's too");
    assert!(tb.nodes.len() >= 2);
}

/// On each node a pod whose writer puts a page into an emptyDir that its server
/// container serves; the pod on the first node fetches the second node's page.
#[tokio::test]
async fn pods_share_an_emptydir_and_reach_each_other_across_nodes() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-network").await.unwrap();
    let pods = ns.pods(&client);
    let (first, second) = (&tb.nodes[0], &tb.nodes[1]);

    let web = |name: &str, node: &str, page: &str| {
        pod(
            name,
            node,
            json!([
                {"name": "writer", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", format!("echo {page} > /data/index.html && exec sleep 100000")],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "server", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["httpd", "-f", "-p", "8080", "-h", "/data"],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                 "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}
            ]),
            json!([{"name": "data", "emptyDir": {}}]),
        )
    };
    let page = format!("page-from-{second}-{}", ns.name);
    pods.create(&PostParams::default(), &web("server", second, &page))
        .await
        .unwrap();
    let server = ns.wait_ready(&client, "server", Duration::from_secs(90)).await.unwrap();
    let server_ip = server.status.and_then(|s| s.pod_ip).unwrap();

    // The client pod also serves a page, so both nodes run the two-container pod.
    let client_pod = {
        let mut p = web("client", first, "client");
        let fetch = json!({"name": "fetcher", "image": BUSYBOX, "imagePullPolicy": "Never",
            "command": ["sh", "-c", format!("until wget -qO- http://{server_ip}:8080/index.html; do sleep 1; done; exec sleep 100000")]});
        p.spec
            .as_mut()
            .unwrap()
            .containers
            .push(serde_json::from_value(fetch).unwrap());
        p
    };
    pods.create(&PostParams::default(), &client_pod).await.unwrap();
    let client_status = ns.wait_ready(&client, "client", Duration::from_secs(90)).await.unwrap();
    assert_eq!(client_status.spec.unwrap().node_name.as_deref(), Some(first.as_str()));

    let fetched = wait_until("the fetcher to print the page", Duration::from_secs(60), || async {
        let logs = pods
            .logs(
                "client",
                &LogParams {
                    container: Some("fetcher".into()),
                    ..Default::default()
                },
            )
            .await
            .ok()?;
        logs.contains(&page).then_some(logs)
    })
    .await
    .unwrap();
    assert_eq!(
        fetched.trim(),
        page,
        "the page written into the emptyDir on {second} arrived on {first}"
    );
}

/// The kubelet's checkpoint API drives containerd, runc and CRIU; checkpointctl
/// reads the archive. This proves CRIU works under the runtime on these nodes.
#[tokio::test]
async fn kubelet_checkpoint_api_writes_an_archive_checkpointctl_reads() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-checkpoint").await.unwrap();
    let pods = ns.pods(&client);
    let node = &tb.nodes[0];
    let counter = pod(
        "counter",
        node,
        json!([{"name": "count", "image": BUSYBOX, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.2; done"]}]),
        json!([]),
    );
    pods.create(&PostParams::default(), &counter).await.unwrap();
    ns.wait_ready(&client, "counter", Duration::from_secs(60))
        .await
        .unwrap();

    let request = http::Request::post(format!(
        "/api/v1/nodes/{node}/proxy/checkpoint/{}/counter/count?timeout=60",
        ns.name
    ))
    .body(Vec::new())
    .unwrap();
    let answer: serde_json::Value = client.request(request).await.unwrap();
    let archive = answer["items"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no archive in {answer}"))
        .to_owned();
    assert!(
        archive.starts_with(tb.dir.to_str().unwrap()),
        "{archive} lies in the node's kubelet directory"
    );

    let stdout = tb
        .checkpointctl_show(std::path::Path::new(&archive))
        .unwrap_or_else(|e| panic!("checkpointctl show failed: {e}"));
    assert!(
        stdout.contains("count") && stdout.contains(BUSYBOX),
        "checkpointctl shows the container: {stdout}"
    );
    std::fs::remove_file(&archive).unwrap();

    // The checkpointed container keeps running (the kubelet API leaves it running).
    let logs_after = |pods: Api<Pod>| async move {
        pods.logs(
            "counter",
            &LogParams {
                tail_lines: Some(1),
                ..Default::default()
            },
        )
        .await
        .ok()
    };
    let before: u64 = logs_after(pods.clone()).await.unwrap().trim().parse().unwrap();
    wait_until(
        "the counter to keep counting after the checkpoint",
        Duration::from_secs(20),
        || async {
            let now: u64 = logs_after(pods.clone()).await?.trim().parse().ok()?;
            (now > before).then_some(())
        },
    )
    .await
    .unwrap();
}

/// A multipart upload of 13 MiB in parts of 5 MiB reads back byte for byte; a wrong
/// secret is refused.
#[tokio::test]
async fn s3_multipart_upload_returns_identical_bytes() {
    let tb = Testbed::from_env().unwrap();
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let data: Vec<u8> = (0..13 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let key = ObjectPath::from(format!("e2e/multipart-{}", std::process::id()));

    let upload = store.put_multipart(&key).await.unwrap();
    let mut writer = WriteMultipart::new_with_chunk_size(upload, 5 * 1024 * 1024);
    for chunk in data.chunks(1024 * 1024) {
        writer.write(chunk);
    }
    writer.finish().await.unwrap();

    let read = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(read.len(), data.len());
    assert!(
        read.as_ref() == data.as_slice(),
        "the bytes read back differ from those written"
    );
    store.delete(&key).await.unwrap();

    let wrong = tb.s3_store(&tb.s3.endpoint, "not-the-secret").unwrap();
    assert!(wrong.get(&key).await.is_err(), "a wrong secret must be refused");
}
