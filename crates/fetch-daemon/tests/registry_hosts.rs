//! `dedupd` reaching registries as containerd's hosts.toml says: lazy fetches go to the mirror it
//! names, to the upstream when the mirror is down, and a broken hosts.toml is logged with its line and
//! ignored. The real binary, a real FUSE mount, a real docker-registry upstream; the mirror is the
//! scripted blob server, which counts what it serves and can refuse connections.

mod common;

use std::path::Path;

use common::*;

fn write_hosts(hosts_dir: &Path, registry: &str, text: &str) -> std::path::PathBuf {
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hosts.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn lazy_fetches_go_to_the_mirror_then_to_the_upstream_when_it_is_down() {
    require_fuse();
    let upstream = Registry::start();
    let blob = data((4 * MIB + 321) as usize, 21);
    upstream.push("layers/mirrored", &blob);
    let mirror = BlobServer::start(blob.clone());
    let place = Place::new();
    let hosts = place.dir.path().join("certs.d");
    // A name that resolves nowhere: only hosts.toml says where it is.
    let name = "reg.test:5000";
    write_hosts(
        &hosts,
        name,
        &format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            upstream.addr, mirror.addr
        ),
    );
    let d = Dedupd::start(
        &place,
        &[
            "--no-prefetch",
            "--hosts-dir",
            hosts.to_str().unwrap(),
            "--connect-timeout-secs",
            "2",
        ],
    );
    let reg = d
        .client
        .register(&spec_for(&blob, MIB, name, "layers/mirrored"))
        .unwrap();
    let file = std::fs::File::open(&reg.path).unwrap();

    assert_eq!(read_at(&file, 10, 1000).unwrap(), blob[10..1010]);
    let gets = mirror.blob_gets();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(gets[0].path, format!("/v2/layers/mirrored/blobs/{}", digest_of(&blob)));
    assert_eq!(gets[0].range, Some((0, MIB - 1)));

    // The mirror refuses connections from now on: the next chunk comes from the upstream.
    mirror.set_mode(Mode::Refuse);
    let offset = 2 * MIB + 5;
    assert_eq!(
        read_at(&file, offset, 4096).unwrap(),
        blob[offset as usize..offset as usize + 4096]
    );
    assert_eq!(mirror.blob_gets().len(), 2, "the mirror was tried first");
    let log = d.log_text();
    assert!(log.contains("trying the next one"), "{log}");
}

#[test]
fn a_broken_hosts_toml_is_logged_with_its_line_and_ignored() {
    require_fuse();
    let upstream = Registry::start();
    let blob = data((MIB + 99) as usize, 22);
    upstream.push("layers/plain", &blob);
    let place = Place::new();
    let hosts = place.dir.path().join("certs.d");
    // Read, it would send everything to a port nothing listens on.
    let file = write_hosts(
        &hosts,
        &upstream.addr,
        "server = \"http://127.0.0.1:1\"\n[host.\"http://127.0.0.1:2\"]\n  skip_verify = \"sometimes\"\n",
    );
    let d = Dedupd::start(&place, &["--no-prefetch", "--hosts-dir", hosts.to_str().unwrap()]);
    let reg = d
        .client
        .register(&spec_for(&blob, MIB, &upstream.addr, "layers/plain"))
        .unwrap();
    assert_eq!(read_all(Path::new(&reg.path)), blob);
    let log = d.log_text();
    assert!(log.contains(&format!("{}:3: ", file.display())), "{log}");
    assert!(log.contains("WARN"), "{log}");
}
