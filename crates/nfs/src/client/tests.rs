use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use nfs3_server::memfs::{MemFs, MemFsConfig};
use nfs3_server::tcp::{NFSTcp, NFSTcpListener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;

const SHARE: &str = "/export/rw";

/// An in-process memfs server exporting `/export` whose `rw` directory
/// (plus whatever `setup` adds below `/rw`) is the share.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn memfs(setup: impl FnOnce(&mut MemFsConfig)) -> Server {
    let mut config = MemFsConfig::default();
    config.add_dir("/rw");
    setup(&mut config);
    let fs = MemFs::new(config).expect("memfs config");
    let mut listener = NFSTcpListener::bind("127.0.0.1:0", fs)
        .await
        .expect("bind memfs server");
    listener.with_export_name("export");
    let addr = SocketAddr::new(listener.get_listen_ip(), listener.get_listen_port());
    let task = tokio::spawn(async move {
        let _ = listener.handle_forever().await;
    });
    Server { addr, task }
}

fn target(addr: SocketAddr) -> NfsTarget {
    NfsTarget {
        server: addr.ip(),
        share: SHARE.to_owned(),
        port: Some(addr.port()),
    }
}

fn client(addr: SocketAddr) -> NfsClient {
    NfsClient::new(target(addr), ClientConfig::default())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward both ways.
    Pass,
    /// New connections are accepted and closed at once; established ones
    /// are closed when the client next sends something.
    Drop,
    /// New connections are accepted and never answered; established ones
    /// swallow whatever the client sends from now on.
    BlackHole,
}

/// A TCP proxy in front of a server that can make it vanish or go silent.
struct Proxy {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    accepted: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (mode, accepted) = (Arc::clone(&mode), Arc::clone(&accepted));
            let peers = Arc::clone(&peers);
            async move {
                loop {
                    let Ok((client, peer)) = listener.accept().await else {
                        return;
                    };
                    peers.lock().expect("peers lock").push(peer);
                    accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(Self::serve(client, upstream, Arc::clone(&mode)));
                }
            }
        });
        Self {
            addr,
            mode,
            accepted,
            peers,
            task,
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("mode lock") = mode;
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    async fn serve(mut client: TcpStream, upstream: SocketAddr, mode: Arc<Mutex<Mode>>) {
        let now = || *mode.lock().expect("mode lock");
        match now() {
            Mode::Drop => return,
            Mode::BlackHole => {
                let mut buf = [0u8; 4096];
                while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
                return;
            }
            Mode::Pass => {}
        }
        let Ok(mut up) = TcpStream::connect(upstream).await else {
            return;
        };
        let (mut from_client, mut from_up) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
        let mut stalled = false;
        loop {
            tokio::select! {
                r = client.read(&mut from_client) => {
                    let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                    match now() {
                        Mode::Pass if !stalled => {
                            if up.write_all(&from_client[..n]).await.is_err() {
                                return;
                            }
                        }
                        Mode::Drop => return,
                        Mode::Pass | Mode::BlackHole => stalled = true,
                    }
                }
                r = up.read(&mut from_up), if !stalled => {
                    let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                    if client.write_all(&from_up[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Run `fut` on another task and insist it finishes within `limit`. A
/// task spinning on a dead connection never yields, so this can't just
/// panic and unwind (the runtime would wait for it forever): it aborts.
async fn must_finish<T: Send + 'static>(
    limit: Duration,
    fut: impl Future<Output = T> + Send + 'static,
) -> (T, Duration) {
    let start = Instant::now();
    match tokio::time::timeout(limit, tokio::spawn(fut)).await {
        Ok(joined) => (joined.expect("task panicked"), start.elapsed()),
        Err(_) => {
            // Not eprintln!: the test harness would swallow it.
            let _ = writeln!(
                io::stderr(),
                "call did not return within {limit:?} (spinning on a dead connection?)"
            );
            std::process::abort();
        }
    }
}

/// Names in a directory of the share, via a pooled connection.
async fn names(client: &NfsClient, path: &[&str]) -> Vec<String> {
    let mut conn = client.lease().await.expect("lease");
    let dir = conn.walk_dir(path).await.expect("walk");
    let mut names: Vec<String> = conn
        .list(&dir, &join(path))
        .await
        .expect("list")
        .into_iter()
        .map(|e| String::from_utf8(e.name).expect("utf-8 name"))
        .collect();
    names.sort();
    names
}

#[test]
fn components_are_validated() {
    for ok in [
        "a",
        "pvc-123",
        "...",
        ".hidden",
        "a b",
        "ü",
        &"x".repeat(255),
    ] {
        assert!(validate_component(ok).is_ok(), "{ok:?} should be accepted");
    }
    let long = "x".repeat(256);
    for (bad, reason) in [
        ("", "empty"),
        (".", "`.`"),
        ("..", "`..`"),
        ("a/b", "`/`"),
        ("/", "`/`"),
        ("../../etc", "`/`"),
        ("a\0b", "NUL"),
        (long.as_str(), "255"),
    ] {
        match validate_component(bad) {
            Err(NfsError::InvalidName { reason: r, .. }) => {
                assert!(r.contains(reason), "{bad:?}: reason {r:?}");
            }
            other => panic!("{bad:?} accepted: {other:?}"),
        }
    }
    let err = validate_component("a\0b").expect_err("NUL");
    assert!(err.to_string().contains(r#""a\0b""#), "{err}");
}

#[test]
fn status_mapping() {
    let e = |s| status_error("MKDIR", "a/b", s);
    assert!(matches!(e(nfsstat3::NFS3ERR_NOENT), NfsError::NotFound { path } if path == "a/b"));
    assert!(matches!(
        e(nfsstat3::NFS3ERR_EXIST),
        NfsError::AlreadyExists { .. }
    ));
    assert!(matches!(
        e(nfsstat3::NFS3ERR_ACCES),
        NfsError::PermissionDenied { op: "MKDIR", .. }
    ));
    assert!(matches!(
        e(nfsstat3::NFS3ERR_PERM),
        NfsError::PermissionDenied { .. }
    ));
    assert!(matches!(e(nfsstat3::NFS3ERR_NOSPC), NfsError::NoSpace));
    assert!(matches!(e(nfsstat3::NFS3ERR_DQUOT), NfsError::NoSpace));
    assert!(matches!(
        e(nfsstat3::NFS3ERR_NOTDIR),
        NfsError::NotADirectory { .. }
    ));
    match e(nfsstat3::NFS3ERR_IO) {
        NfsError::Server { op, status, .. } => {
            assert_eq!((op, status.as_str()), ("MKDIR", "NFS3ERR_IO"))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn create_dir_all_creates_then_reports_existing() {
    let server = memfs(|_| {}).await;
    let client = client(server.addr);
    let created = client
        .create_dir_all(&["vol"], 0o750, Some((1000, 1000)))
        .await
        .expect("mkdir");
    assert!(
        matches!(created, Mkdir::Created(a) if a.is_dir()),
        "{created:?}"
    );
    let again = client
        .create_dir_all(&["vol"], 0o750, None)
        .await
        .expect("mkdir again");
    assert_eq!(again, Mkdir::Existed(*created.attr()));
    // memfs would happily add a duplicate "vol": the lookup-first kept it single.
    assert_eq!(names(&client, &[]).await, ["vol"]);
    let attr = client.stat(&["vol"]).await.expect("stat").expect("exists");
    assert_eq!(attr.fileid, created.attr().fileid);
}

#[tokio::test]
async fn create_dir_needs_parent_and_create_dir_all_refuses_files() {
    let server = memfs(|c| c.add_file("/rw/file", b"data".to_vec())).await;
    let client = client(server.addr);
    match client
        .create_dir(&["missing", "deeper", "vol"], 0o755, None)
        .await
    {
        Err(NfsError::NotFound { path }) => assert_eq!(path, "missing"),
        other => panic!("{other:?}"),
    }
    match client.create_dir_all(&["file"], 0o755, None).await {
        Err(NfsError::NotADirectory { path }) => assert_eq!(path, "file"),
        other => panic!("{other:?}"),
    }
    match client.create_dir_all(&["file", "vol"], 0o755, None).await {
        Err(NfsError::NotADirectory { path }) => assert_eq!(path, "file"),
        other => panic!("{other:?}"),
    }
    assert_eq!(names(&client, &[]).await, ["file"]);
}

#[tokio::test]
async fn create_dir_all_creates_parents() {
    let server = memfs(|c| c.add_dir("/rw/a")).await;
    let client = client(server.addr);
    let made = client
        .create_dir_all(&["a", "b", "c"], 0o755, None)
        .await
        .expect("create_dir_all");
    assert!(made.created());
    assert!(
        client
            .stat(&["a", "b"])
            .await
            .expect("stat")
            .expect("b")
            .is_dir()
    );
    let again = client
        .create_dir_all(&["a", "b", "c"], 0o755, None)
        .await
        .expect("again");
    assert_eq!(again, Mkdir::Existed(*made.attr()));
    assert_eq!(names(&client, &["a"]).await, ["b"]);
    assert_eq!(names(&client, &["a", "b"]).await, ["c"]);
}

#[tokio::test]
async fn stat_reports_missing_as_none() {
    let server = memfs(|c| c.add_file("/rw/f", b"12345".to_vec())).await;
    let client = client(server.addr);
    assert_eq!(client.stat(&["nope"]).await.expect("stat"), None);
    assert_eq!(client.stat(&["nope", "deeper"]).await.expect("stat"), None);
    let root = client.stat(&[]).await.expect("stat root").expect("root");
    assert!(root.is_dir());
    let f = client.stat(&["f"]).await.expect("stat f").expect("f");
    assert_eq!((f.kind, f.size), (FileKind::File, 5));
    assert_eq!(client.stat(&["f", "below"]).await.expect("stat"), None);
    assert!(
        !client
            .remove_all(&["f", "below"])
            .await
            .expect("remove_all")
    );
    assert!(
        !client
            .remove_all(&["f", "below", "deeper"])
            .await
            .expect("remove_all")
    );
}

#[tokio::test]
async fn hostile_components_are_rejected_before_any_io() {
    let server = memfs(|c| c.add_dir("/rw/a")).await;
    let good = client(server.addr);
    // Nothing listens on port 1: any I/O would be a Connect error.
    let offline = NfsClient::new(
        NfsTarget {
            server: IpAddr::V4(Ipv4Addr::LOCALHOST),
            share: SHARE.to_owned(),
            port: Some(1),
        },
        ClientConfig::default(),
    );
    let hostile: [&[&str]; 7] = [
        &[".."],
        &["..", "..", "escape"],
        &["a", "."],
        &["a/b"],
        &["a", ""],
        &["a\0b"],
        &["a", "../../escape"],
    ];
    for client in [&good, &offline] {
        for path in hostile {
            let invalid = |r: Result<(), NfsError>| {
                assert!(
                    matches!(r, Err(NfsError::InvalidName { .. })),
                    "{path:?}: {r:?}"
                );
            };
            invalid(client.create_dir(path, 0o777, None).await.map(drop));
            invalid(client.create_dir_all(path, 0o777, None).await.map(drop));
            invalid(client.remove_all(path).await.map(drop));
            invalid(client.stat(path).await.map(drop));
            invalid(client.rename(&["a"], path).await);
            invalid(client.rename(path, &["z"]).await);
        }
        // The root itself can't be created, removed or renamed.
        assert!(matches!(
            client.remove_all(&[]).await,
            Err(NfsError::InvalidName { .. })
        ));
        assert!(matches!(
            client.create_dir_all(&[], 0o755, None).await,
            Err(NfsError::InvalidName { .. })
        ));
    }
    assert_eq!(names(&good, &[]).await, ["a"]);
    assert!(names(&good, &["a"]).await.is_empty());
}

#[tokio::test]
async fn remove_all_removes_a_tree_with_many_entries() {
    let server = memfs(|c| {
        c.add_dir("/rw/keep");
        c.add_dir("/rw/vol");
        c.add_file("/rw/vol/top.txt", b"x".to_vec());
        c.add_dir("/rw/vol/empty");
        c.add_dir("/rw/vol/d1");
        c.add_dir("/rw/vol/d1/d2");
        c.add_dir("/rw/vol/d1/d2/d3");
        c.add_file("/rw/vol/d1/d2/d3/deep.txt", b"deep".to_vec());
        c.add_dir("/rw/vol/big");
        for i in 0..1500 {
            c.add_file(
                &format!("/rw/vol/big/a-fairly-long-file-name-{i:05}"),
                b"y".to_vec(),
            );
        }
    })
    .await;
    let client = client(server.addr);
    // The big directory takes several READDIRPLUS pages; all must be seen.
    {
        let mut conn = client.lease().await.expect("lease");
        let big = conn.walk_dir(&["vol", "big"]).await.expect("walk");
        let first = conn
            .nfs
            .readdirplus(&READDIRPLUS3args {
                dir: big.clone(),
                cookie: 0,
                cookieverf: cookieverf3::default(),
                dircount: READDIR_DIRCOUNT,
                maxcount: READDIR_MAXCOUNT,
            })
            .await
            .expect("readdirplus")
            .unwrap();
        assert!(!first.reply.eof, "the test needs more than one page");
        assert_eq!(conn.list(&big, "vol/big").await.expect("list").len(), 1500);
    }
    assert!(client.remove_all(&["vol"]).await.expect("remove_all"));
    assert_eq!(client.stat(&["vol"]).await.expect("stat"), None);
    assert_eq!(names(&client, &[]).await, ["keep"]);
    assert!(!client.remove_all(&["vol"]).await.expect("again"));
    assert!(
        !client
            .remove_all(&["nope", "vol"])
            .await
            .expect("missing parent")
    );
}

#[tokio::test]
async fn remove_all_removes_a_single_file() {
    let server = memfs(|c| c.add_file("/rw/f", b"x".to_vec())).await;
    let client = client(server.addr);
    assert!(client.remove_all(&["f"]).await.expect("remove file"));
    assert!(names(&client, &[]).await.is_empty());
}

#[tokio::test]
async fn rename_moves_and_never_replaces() {
    let server = memfs(|c| {
        c.add_dir("/rw/a");
        c.add_file("/rw/a/inside", b"x".to_vec());
        c.add_dir("/rw/b");
        c.add_dir("/rw/archive");
    })
    .await;
    let client = client(server.addr);
    client
        .rename(&["a"], &["archive", "a-1"])
        .await
        .expect("rename");
    assert_eq!(client.stat(&["a"]).await.expect("stat"), None);
    assert_eq!(names(&client, &["archive", "a-1"]).await, ["inside"]);
    match client.rename(&["b"], &["archive", "a-1"]).await {
        Err(NfsError::AlreadyExists { path }) => assert_eq!(path, "archive/a-1"),
        other => panic!("{other:?}"),
    }
    match client.rename(&["a"], &["c"]).await {
        Err(NfsError::NotFound { path }) => assert_eq!(path, "a"),
        other => panic!("{other:?}"),
    }
    match client.rename(&["b"], &["nope", "b"]).await {
        Err(NfsError::NotFound { path }) => assert_eq!(path, "nope"),
        other => panic!("{other:?}"),
    }
    assert!(client.stat(&["b"]).await.expect("stat").is_some());
}

#[tokio::test]
async fn read_dir_lists_names_and_refuses_files() {
    let server = memfs(|c| {
        c.add_dir("/rw/rec");
        c.add_file("/rw/rec/v1", b"{}".to_vec());
        c.add_file("/rw/rec/empty", Vec::new());
    })
    .await;
    let client = client(server.addr);
    assert_eq!(
        client.read_dir(&["rec"]).await.expect("read_dir"),
        Some(vec!["empty".to_owned(), "v1".to_owned()])
    );
    assert_eq!(client.read_dir(&["nope"]).await.expect("read_dir"), None);
    assert!(matches!(
        client.read_dir(&["rec", "v1"]).await,
        Err(NfsError::NotADirectory { .. })
    ));
    assert_eq!(
        client.read_dir(&[]).await.expect("root"),
        Some(vec!["rec".to_owned()])
    );
}

#[tokio::test]
async fn create_dir_and_remove_dir_are_single_calls() {
    let server = memfs(|c| c.add_file("/rw/f", b"x".to_vec())).await;
    let client = client(server.addr);
    let attr = client
        .create_dir(&["d"], 0o755, None)
        .await
        .expect("create_dir");
    assert!(attr.is_dir());
    client
        .create_dir(&["d", "e"], 0o755, None)
        .await
        .expect("create_dir");
    match client.remove_dir(&["d"]).await {
        Err(NfsError::Server { status, .. }) => assert_eq!(status, "NFS3ERR_NOTEMPTY"),
        other => panic!("{other:?}"),
    }
    client.remove_dir(&["d", "e"]).await.expect("remove_dir");
    client.remove_dir(&["d"]).await.expect("remove_dir");
    match client.remove_dir(&["d"]).await {
        Err(NfsError::NotFound { path }) => assert_eq!(path, "d"),
        other => panic!("{other:?}"),
    }
    match client.create_dir(&["nope", "d"], 0o755, None).await {
        Err(NfsError::NotFound { path }) => assert_eq!(path, "nope"),
        other => panic!("{other:?}"),
    }
    assert_eq!(names(&client, &[]).await, ["f"]);
}

/// Handles of an earlier server are STALE (the embedded server's, like a kernel
/// server's after an export moved): after a server restart the next call that walks
/// through a cached directory handle forgets the cache and succeeds on a fresh walk,
/// instead of failing once.
#[tokio::test]
async fn a_restarted_server_s_stale_handles_are_walked_again_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let any_port = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let first = crate::server::EmbeddedServer::start(data.clone(), any_port)
        .await
        .expect("start the embedded server");
    let addr = first.local_addr();
    let target = NfsTarget {
        server: addr.ip(),
        share: first.export_path().to_owned(),
        port: Some(addr.port()),
    };
    let client = NfsClient::new(target, ClientConfig::default());
    client
        .create_dir_all(&["d"], 0o755, None)
        .await
        .expect("create_dir_all");
    client
        .create_dir(&["d", "first"], 0o755, None)
        .await
        .expect("create_dir through a fresh walk");
    first.shutdown().await;
    let second = crate::server::EmbeddedServer::start(data.clone(), addr)
        .await
        .expect("start the embedded server again on the same port");
    client
        .create_dir(&["d", "second"], 0o755, None)
        .await
        .expect("create_dir through the cached (now stale) handle of `d`");
    assert_eq!(names(&client, &["d"]).await, ["first", "second"]);
    second.shutdown().await;
}

#[tokio::test]
async fn fsstat_reports_the_export() {
    let server = memfs(|c| c.add_dir("/rw/d")).await;
    let client = client(server.addr);
    assert!(client.stat(&["d"]).await.expect("stat").is_some());
    let st = client.fsstat().await.expect("fsstat");
    // memfs reports a fixed 1 TiB / 1 Gi files.
    assert_eq!(st.total_bytes, 1 << 40);
    assert_eq!(st.avail_files, 1 << 30);
    // Everything ran on one connection, which is back in the pool.
    assert_eq!(client.idle_connections(), 1);
}

#[tokio::test]
async fn unknown_share_is_a_connect_error() {
    let server = memfs(|_| {}).await;
    let mut t = target(server.addr);
    t.share = "/export/nope".to_owned();
    let client = NfsClient::new(t, ClientConfig::default());
    match client.stat(&[]).await.map(drop) {
        Err(e @ NfsError::Connect { .. }) => {
            assert!(e.to_string().contains("MNT3ERR_NOENT"), "{e}");
            assert!(e.is_transient());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_going_away_fails_fast_then_reconnects() {
    let server = memfs(|c| c.add_dir("/rw/d")).await;
    let proxy = Proxy::start(server.addr).await;
    let client = NfsClient::new(target(proxy.addr), ClientConfig::default());
    client.stat(&["d"]).await.expect("stat").expect("d");
    assert_eq!(client.idle_connections(), 1);

    // The server vanishes while a pooled connection looks healthy: the
    // next call hits end-of-stream mid-call.
    proxy.set(Mode::Drop);
    let c = client.clone();
    let (res, took) =
        must_finish(Duration::from_secs(3), async move { c.stat(&["d"]).await }).await;
    match res {
        Err(NfsError::Io { op, source }) => {
            assert_eq!(op, "LOOKUP");
            assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
        }
        other => panic!("{other:?}"),
    }
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(
        client.idle_connections(),
        0,
        "a broken connection went back to the pool"
    );

    // Still gone: a listener that accepts and hangs up, during MOUNT.
    let c = client.clone();
    let (res, took) = must_finish(Duration::from_secs(3), async move {
        c.create_dir_all(&["x"], 0o755, None).await
    })
    .await;
    match res {
        Err(e @ NfsError::Connect { .. }) => assert!(e.is_transient(), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // Back again: the next call reconnects.
    proxy.set(Mode::Pass);
    client
        .stat(&["d"])
        .await
        .expect("stat after reconnect")
        .expect("d");
    assert_eq!(client.idle_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_server_is_reconnected_transparently() {
    let server = memfs(|c| c.add_dir("/rw/d")).await;
    let proxy = Proxy::start(server.addr).await;
    let client = NfsClient::new(target(proxy.addr), ClientConfig::default());
    client.stat(&["d"]).await.expect("stat").expect("d");
    // Close the pooled connection's socket from the server side while idle
    // (the proxy hangs up on the next byte it sees; send it one).
    proxy.set(Mode::Drop);
    {
        let stream = {
            let idle = client.inner.idle.lock().expect("idle");
            Arc::clone(&idle[0].stream)
        };
        stream.writable().await.expect("writable");
        stream.try_write(&[0]).expect("poke");
        // Wait until the proxy has really hung up (readiness may be stale).
        loop {
            stream.readable().await.expect("readable");
            match stream.try_read(&mut [0u8; 1]) {
                Ok(0) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    proxy.set(Mode::Pass);
    // The dead idle connection is noticed before use and replaced.
    client
        .stat(&["d"])
        .await
        .expect("stat after restart")
        .expect("d");
    assert_eq!(proxy.accepted(), 4, "expected exactly one reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_times_out_and_connection_is_dropped() {
    let server = memfs(|c| c.add_dir("/rw/d")).await;
    let proxy = Proxy::start(server.addr).await;
    let after = Duration::from_millis(300);
    let client = NfsClient::new(
        target(proxy.addr),
        ClientConfig {
            call_timeout: after,
            ..ClientConfig::default()
        },
    );
    client.stat(&["d"]).await.expect("stat").expect("d");
    // MOUNT + NFS connection.
    assert_eq!(proxy.accepted(), 2);

    proxy.set(Mode::BlackHole);
    let c = client.clone();
    let (res, took) =
        must_finish(Duration::from_secs(3), async move { c.stat(&["d"]).await }).await;
    match res {
        Err(e @ NfsError::Timeout { .. }) => {
            assert!(
                matches!(e, NfsError::Timeout { op: "LOOKUP", after: a } if a == after),
                "{e:?}"
            );
            assert!(e.is_transient());
        }
        other => panic!("{other:?}"),
    }
    assert!(
        took >= after && took < after + Duration::from_secs(1),
        "took {took:?}"
    );
    assert_eq!(client.idle_connections(), 0);

    proxy.set(Mode::Pass);
    client
        .stat(&["d"])
        .await
        .expect("stat after timeout")
        .expect("d");
    // The silent connection was not reused: a new one was opened.
    assert_eq!(proxy.accepted(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_times_out_on_connect() {
    let server = memfs(|_| {}).await;
    let proxy = Proxy::start(server.addr).await;
    proxy.set(Mode::BlackHole);
    let after = Duration::from_millis(300);
    let client = NfsClient::new(
        target(proxy.addr),
        ClientConfig {
            connect_timeout: after,
            ..ClientConfig::default()
        },
    );
    let c = client.clone();
    let (res, took) = must_finish(Duration::from_secs(3), async move {
        c.stat(&[]).await.map(drop)
    })
    .await;
    match res {
        Err(e @ NfsError::Connect { .. }) => {
            assert!(e.to_string().contains("no answer"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        took >= after && took < after + Duration::from_secs(1),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_call_does_not_return_its_connection() {
    let server = memfs(|c| c.add_dir("/rw/d")).await;
    let proxy = Proxy::start(server.addr).await;
    let client = NfsClient::new(target(proxy.addr), ClientConfig::default());
    client.stat(&["d"]).await.expect("stat");
    proxy.set(Mode::BlackHole);
    let cancelled = tokio::time::timeout(Duration::from_millis(100), client.stat(&["d"])).await;
    assert!(
        cancelled.is_err(),
        "the call should still have been waiting"
    );
    assert_eq!(client.idle_connections(), 0);
    proxy.set(Mode::Pass);
    client.stat(&["d"]).await.expect("stat").expect("d");
    assert_eq!(proxy.accepted(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_bounds_connections() {
    let server = memfs(|c| c.add_dir("/rw/p")).await;
    let proxy = Proxy::start(server.addr).await;
    let client = NfsClient::new(
        target(proxy.addr),
        ClientConfig {
            max_connections: 2,
            ..ClientConfig::default()
        },
    );
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                let name = format!("v{i}");
                c.create_dir_all(&["p", &name], 0o755, None).await
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.expect("join").expect("mkdir").created());
    }
    assert_eq!(names(&client, &["p"]).await.len(), 32);
    let nfs_connections = proxy.accepted() / 2;
    assert!(
        (1..=2).contains(&nfs_connections),
        "{nfs_connections} connections"
    );
    assert!(client.idle_connections() <= 2);
}

#[tokio::test]
async fn privileged_port_is_used_when_asked() {
    let server = memfs(|_| {}).await;
    let proxy = Proxy::start(server.addr).await;
    let client = NfsClient::new(
        target(proxy.addr),
        ClientConfig {
            privileged_port: true,
            ..ClientConfig::default()
        },
    );
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .expect("effective uid");
    match client.stat(&[]).await.map(drop) {
        Ok(()) => {
            assert_eq!(euid, "0", "a non-root process got a privileged port?");
            let peers = proxy.peers.lock().expect("peers").clone();
            assert_eq!(peers.len(), 2);
            assert!(peers.iter().all(|p| p.port() < 1024), "{peers:?}");
        }
        Err(e @ NfsError::Connect { .. }) if euid != "0" => {
            assert!(e.to_string().contains("CAP_NET_BIND_SERVICE"), "{e}");
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn idle_check_sees_a_closed_peer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stream = Arc::new(
        TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect"),
    );
    let (peer, _) = listener.accept().await.expect("accept");
    let mut transport = Transport {
        stream: Arc::clone(&stream),
    };
    let alive = |s: &Arc<TcpStream>| {
        let mut b = [0u8; 1];
        matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    };
    assert!(alive(&stream));
    drop(peer);
    stream.readable().await.expect("readable");
    assert!(!alive(&stream));
    // And a read on it is an error, not an endless stream of zero-length reads.
    let mut buf = [0u8; 4];
    let err = transport
        .async_read(&mut buf)
        .await
        .expect_err("EOF must be an error");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

/// Against a real nfs-ganesha, under `tests/support/with-ganesha` (as `tests/run`
/// runs everything); skipped with a message elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ganesha() {
    use std::os::unix::fs::{MetadataExt, symlink};

    if std::env::var_os("STOWAGE_TEST_NFS_SERVER").is_none() {
        assert!(
            std::env::var("STOWAGE_REQUIRE_GANESHA").as_deref() != Ok("1"),
            "STOWAGE_REQUIRE_GANESHA=1 but not under tests/support/with-ganesha"
        );
        eprintln!("SKIPPED client::tests::ganesha: needs tests/support/with-ganesha");
        return;
    }
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let server: IpAddr = env("STOWAGE_TEST_NFS_SERVER").parse().expect("server ip");
    let share_dir = std::path::PathBuf::from(env("STOWAGE_TEST_NFS_SHARE_DIR"));
    let config = ClientConfig {
        privileged_port: true,
        call_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    let client = NfsClient::new(
        NfsTarget {
            server,
            share: env("STOWAGE_TEST_NFS_SHARE"),
            port: None,
        },
        config.clone(),
    );
    client.stat(&[]).await.expect("probe");
    let top = format!("client-test-{}", std::process::id());
    let top = top.as_str();
    client.remove_all(&[top]).await.expect("clean");

    // Mode and owner are applied exactly.
    let made = client
        .create_dir_all(&[top], 0o2750, Some((1234, 5678)))
        .await
        .expect("mkdir");
    println!("ganesha mkdir 0o2750 owner 1234:5678 -> {made:?}");
    let a = *made.attr();
    assert!(made.created());
    assert_eq!((a.mode & 0o7777, a.uid, a.gid), (0o2750, 1234, 5678));
    let meta = std::fs::metadata(share_dir.join(top)).expect("local metadata");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o2750, 1234, 5678)
    );
    assert_eq!(
        client
            .create_dir_all(&[top], 0o700, None)
            .await
            .expect("again"),
        Mkdir::Existed(a)
    );

    // Raw MKDIR of an existing name: does ganesha answer EXIST?
    {
        let mut conn = client.lease().await.expect("lease");
        let root = conn.root.clone();
        let res = conn
            .nfs
            .mkdir(&MKDIR3args {
                where_: dirop(&root, top.as_bytes()),
                attributes: sattr3::default(),
            })
            .await
            .expect("raw mkdir");
        println!(
            "ganesha raw MKDIR of an existing dir -> {:?}",
            status_of(&res)
        );
        assert_eq!(status_of(&res), nfsstat3::NFS3ERR_EXIST);
    }

    // Concurrent mkdir of one name: exactly one creates it.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = client.clone();
            let p = top.to_owned();
            tokio::spawn(async move { c.create_dir_all(&[&p, "race"], 0o755, None).await })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        created += usize::from(t.await.expect("join").expect("mkdir").created());
    }
    assert_eq!(created, 1);

    // Nested, then a tree with files, a symlink and more than one page.
    let made = client
        .create_dir_all(&[top, "a", "b", "c"], 0o700, None)
        .await
        .expect("create_dir_all");
    assert_eq!(made.attr().mode & 0o7777, 0o700);
    let big = share_dir.join(top).join("a").join("big");
    std::fs::create_dir(&big).expect("mkdir big");
    for i in 0..2000 {
        std::fs::write(big.join(format!("file-with-a-long-name-{i:05}")), b"x").expect("write");
    }
    symlink("/etc/passwd", share_dir.join(top).join("a").join("link")).expect("symlink");
    std::fs::write(
        share_dir.join(top).join("a").join("b").join("c").join("f"),
        b"x",
    )
    .expect("write");
    let link = client
        .stat(&[top, "a", "link"])
        .await
        .expect("stat")
        .expect("link");
    assert_eq!(link.kind, FileKind::Symlink);

    // Hostile names never reach the server.
    for bad in ["..", "../escape", "a/../../x"] {
        assert!(matches!(
            client.create_dir_all(&[top, bad], 0o755, None).await,
            Err(NfsError::InvalidName { .. })
        ));
    }

    // Rename never replaces.
    client
        .create_dir_all(&[top, "dst"], 0o755, None)
        .await
        .expect("mkdir dst");
    assert!(matches!(
        client.rename(&[top, "a"], &[top, "dst"]).await,
        Err(NfsError::AlreadyExists { .. })
    ));
    client
        .rename(&[top, "a"], &[top, "dst", "a"])
        .await
        .expect("rename");

    // Single-call directory ops and atomic files.
    match client.create_dir(&[top], 0o755, None).await {
        Err(NfsError::AlreadyExists { path }) => assert_eq!(path, top),
        other => panic!("create_dir of an existing dir: {other:?}"),
    }
    client
        .create_dir(&[top, "single"], 0o1777, None)
        .await
        .expect("create_dir");
    assert_eq!(
        std::fs::metadata(share_dir.join(top).join("single"))
            .expect("meta")
            .mode()
            & 0o7777,
        0o1777
    );
    client
        .remove_dir(&[top, "single"])
        .await
        .expect("remove_dir");
    // A record: one SYMLINK, read back with READLINK; a second is EXIST.
    client
        .symlink(&[top, "rec"], r#"{"capacity_bytes":1}"#)
        .await
        .expect("symlink");
    assert!(matches!(
        client.symlink(&[top, "rec"], "other").await,
        Err(NfsError::AlreadyExists { .. })
    ));
    assert_eq!(
        client
            .readlink(&[top, "rec"])
            .await
            .expect("readlink")
            .as_deref(),
        Some(r#"{"capacity_bytes":1}"#)
    );
    let listed = client
        .read_dir(&[top])
        .await
        .expect("read_dir")
        .expect("exists");
    assert_eq!(listed, ["dst", "race", "rec"]);

    let st = client.fsstat().await.expect("fsstat");
    println!("ganesha fsstat -> {st:?}");
    assert!(st.total_bytes > 0 && st.avail_bytes <= st.total_bytes);

    let t0 = Instant::now();
    assert!(client.remove_all(&[top]).await.expect("remove_all"));
    println!(
        "ganesha remove_all of ~2010 entries took {:?}",
        t0.elapsed()
    );
    assert!(!share_dir.join(top).exists());
    assert!(
        std::fs::metadata("/etc/passwd").is_ok(),
        "symlink target survived"
    );

    // Root squash: root becomes nobody and may not write in a root-owned 0755 dir.
    let squash = NfsClient::new(
        NfsTarget {
            server,
            share: env("STOWAGE_TEST_NFS_SQUASH_SHARE"),
            port: None,
        },
        config.clone(),
    );
    match squash.create_dir_all(&["x"], 0o755, None).await {
        Err(e @ NfsError::PermissionDenied { .. }) => println!("ganesha squash mkdir -> {e}"),
        other => panic!("{other:?}"),
    }

    // Restart: calls fail fast while it is down, then reconnect.
    client.stat(&[]).await.expect("stat");
    let run = |var: &str| {
        let status = std::process::Command::new(env(var))
            .status()
            .expect("run script");
        assert!(status.success(), "{var}");
    };
    run("STOWAGE_TEST_GANESHA_STOP");
    let c = client.clone();
    let (res, took) = must_finish(Duration::from_secs(5), async move { c.stat(&[]).await }).await;
    println!("ganesha down: stat -> {res:?} in {took:?}");
    assert!(res.expect_err("server is down").is_transient());
    run("STOWAGE_TEST_GANESHA_START");
    client
        .stat(&[])
        .await
        .expect("stat after restart")
        .expect("root");
    println!("ganesha back: stat ok");
}

/// A tree on the embedded server's disk, copied over the wire: contents (across
/// chunks and READDIRPLUS pages), modes, owners, times and symlinks (copied as links,
/// never followed) arrive; a FIFO is skipped; an existing destination is refused.
#[tokio::test]
async fn copy_tree_copies_contents_modes_owners_times_and_links() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    use std::path::Path;
    use std::sync::atomic::AtomicU64;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED copy_tree test: needs root (chown)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = data.join("src");
    std::fs::create_dir_all(src.join("deep/er")).unwrap();
    let big: Vec<u8> = (0..(COPY_CHUNK as usize * 2 + 1234))
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("deep/er/small"), b"hello").unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    for i in 0..1500 {
        std::fs::write(src.join(format!("many-{i:04}")), i.to_string()).unwrap();
    }
    symlink("/etc/passwd", src.join("abs-link")).unwrap();
    symlink("deep/er/small", src.join("rel-link")).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    std::fs::set_permissions(src.join("big"), std::fs::Permissions::from_mode(0o640)).unwrap();
    nix::unistd::chown(
        &src.join("deep/er/small"),
        Some(nix::unistd::Uid::from_raw(1234)),
        Some(nix::unistd::Gid::from_raw(4321)),
    )
    .unwrap();
    std::fs::set_permissions(src.join("deep/er"), std::fs::Permissions::from_mode(0o555)).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(src.join("big"))
        .unwrap()
        .set_modified(old)
        .unwrap();

    let server = crate::server::EmbeddedServer::start(
        data.clone(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    )
    .await
    .unwrap();
    let client = NfsClient::new(
        NfsTarget {
            server: server.local_addr().ip(),
            share: server.export_path().to_owned(),
            port: Some(server.local_addr().port()),
        },
        ClientConfig::default(),
    );
    let progress = AtomicU64::new(0);
    let copied = client
        .copy_tree(&["src"], &["dst"], &progress)
        .await
        .unwrap();
    let dst = std::fs::canonicalize(&data).unwrap().join("dst");
    assert_eq!(copied.files, 1500 + 3);
    assert_eq!(copied.symlinks, 2);
    assert_eq!(copied.dirs, 3);
    assert_eq!(copied.skipped, 1, "the FIFO");
    assert_eq!(
        copied.bytes,
        progress.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(std::fs::read(dst.join("big")).unwrap(), big);
    assert_eq!(std::fs::read(dst.join("deep/er/small")).unwrap(), b"hello");
    assert_eq!(
        std::fs::read_to_string(dst.join("many-1499")).unwrap(),
        "1499"
    );
    assert_eq!(std::fs::read_dir(&dst).unwrap().count(), 1500 + 5);
    assert_eq!(
        std::fs::read_link(dst.join("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        std::fs::read_link(dst.join("rel-link")).unwrap(),
        Path::new("deep/er/small")
    );
    assert!(!dst.join("fifo").exists());
    let meta = |p: &str| std::fs::symlink_metadata(dst.join(p)).unwrap();
    assert_eq!(meta("big").mode() & 0o7777, 0o640);
    assert_eq!(meta("big").modified().unwrap(), old);
    assert_eq!(
        (meta("deep/er/small").uid(), meta("deep/er/small").gid()),
        (1234, 4321)
    );
    assert_eq!(
        meta("deep/er").mode() & 0o7777,
        0o555,
        "read-only directory closed last"
    );
    assert_eq!(
        std::fs::read(src.join("big")).unwrap(),
        big,
        "the source is untouched"
    );
    let again = client.copy_tree(&["src"], &["dst"], &progress).await;
    assert!(
        matches!(again, Err(NfsError::AlreadyExists { .. })),
        "{again:?}"
    );
    let missing = client.copy_tree(&["nope"], &["dst2"], &progress).await;
    assert!(
        matches!(missing, Err(NfsError::NotFound { .. })),
        "{missing:?}"
    );
    server.shutdown().await;
}
