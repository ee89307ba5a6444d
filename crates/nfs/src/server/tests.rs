use std::collections::BTreeSet;
use std::future::Future;
use std::os::unix::fs::{MetadataExt, symlink as disk_symlink};

use nfs3_client::tokio::{TokioConnector, TokioIo};
use nfs3_client::{ConnectError, Nfs3Connection, Nfs3ConnectionBuilder};
use nfs3_types::nfs3::{
    CREATE3args, FSSTAT3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Result, READ3args,
    READDIR3args, READDIRPLUS3args, READLINK3args, REMOVE3args, RENAME3args, RMDIR3args,
    SETATTR3args, SYMLINK3args, WRITE3args, cookieverf3, createhow3, diropargs3, entryplus3,
    symlinkdata3,
};
use nfs3_types::rpc::auth_unix;
use tokio::net::TcpStream;

use super::*;

type Conn = Nfs3Connection<TokioIo<TcpStream>>;
type NfsResult<T> = Result<T, nfsstat3>;

/// Fails a test that hangs instead of hanging CI.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test took more than 60 s")
}

struct Fixture {
    tmp: tempfile::TempDir,
    data: PathBuf,
    server: EmbeddedServer,
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = start(&data).await;
    let data = std::fs::canonicalize(&data).expect("canonical data dir");
    Fixture { tmp, data, server }
}

async fn start(dir: &Path) -> EmbeddedServer {
    let bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    EmbeddedServer::start(dir.to_path_buf(), bind)
        .await
        .expect("start embedded server")
}

async fn mount_path(server: &EmbeddedServer, path: &str) -> Result<Conn, ConnectError> {
    let addr = server.local_addr();
    Nfs3ConnectionBuilder::new(TokioConnector, addr.ip().to_string(), path)
        .portmapper_port(addr.port())
        .connect_from_privileged_port(false)
        .credential(opaque_auth::auth_unix(&auth_unix::default()))
        .mount()
        .await
}

async fn mount(server: &EmbeddedServer) -> Conn {
    mount_path(server, server.export_path())
        .await
        .expect("mount the export")
}

fn is_root() -> bool {
    Uid::effective().is_root()
}

fn dirop(dir: &nfs_fh3, name: &[u8]) -> diropargs3<'static> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3::from(name.to_vec()),
    }
}

fn with_mode(mode: u32) -> sattr3 {
    sattr3 {
        mode: set_mode3::Some(mode),
        ..sattr3::default()
    }
}

fn disk_mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
}

fn disk_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

async fn mkdir(
    c: &mut Conn,
    dir: &nfs_fh3,
    name: &[u8],
    attributes: sattr3,
) -> NfsResult<(nfs_fh3, fattr3)> {
    let args = MKDIR3args {
        where_: dirop(dir, name),
        attributes,
    };
    match c.mkdir(&args).await.expect("MKDIR call") {
        Nfs3Result::Ok(ok) => Ok((ok.obj.unwrap(), ok.obj_attributes.unwrap())),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn lookup(c: &mut Conn, dir: &nfs_fh3, name: &[u8]) -> NfsResult<nfs_fh3> {
    let args = LOOKUP3args {
        what: dirop(dir, name),
    };
    match c.lookup(&args).await.expect("LOOKUP call") {
        Nfs3Result::Ok(ok) => Ok(ok.object),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn getattr(c: &mut Conn, fh: &nfs_fh3) -> NfsResult<fattr3> {
    let args = GETATTR3args { object: fh.clone() };
    match c.getattr(&args).await.expect("GETATTR call") {
        Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn setattr(c: &mut Conn, fh: &nfs_fh3, attrs: sattr3) -> NfsResult<fattr3> {
    let args = SETATTR3args {
        object: fh.clone(),
        new_attributes: attrs,
        guard: Nfs3Option::None,
    };
    match c.setattr(&args).await.expect("SETATTR call") {
        Nfs3Result::Ok(ok) => Ok(ok.obj_wcc.after.unwrap()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn rmdir(c: &mut Conn, dir: &nfs_fh3, name: &[u8]) -> NfsResult<()> {
    let args = RMDIR3args {
        object: dirop(dir, name),
    };
    match c.rmdir(&args).await.expect("RMDIR call") {
        Nfs3Result::Ok(_) => Ok(()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn remove(c: &mut Conn, dir: &nfs_fh3, name: &[u8]) -> NfsResult<()> {
    let args = REMOVE3args {
        object: dirop(dir, name),
    };
    match c.remove(&args).await.expect("REMOVE call") {
        Nfs3Result::Ok(_) => Ok(()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn rename(c: &mut Conn, from: (&nfs_fh3, &[u8]), to: (&nfs_fh3, &[u8])) -> NfsResult<()> {
    let args = RENAME3args {
        from: dirop(from.0, from.1),
        to: dirop(to.0, to.1),
    };
    match c.rename(&args).await.expect("RENAME call") {
        Nfs3Result::Ok(_) => Ok(()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn create(c: &mut Conn, dir: &nfs_fh3, name: &[u8], how: createhow3) -> NfsResult<nfs_fh3> {
    let args = CREATE3args {
        where_: dirop(dir, name),
        how,
    };
    match c.create(&args).await.expect("CREATE call") {
        Nfs3Result::Ok(ok) => Ok(ok.obj.unwrap()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn write(c: &mut Conn, fh: &nfs_fh3, offset: u64, data: &[u8]) -> NfsResult<()> {
    let args = WRITE3args {
        file: fh.clone(),
        offset,
        count: u32::try_from(data.len()).expect("small write"),
        stable: stable_how::FILE_SYNC,
        data: Opaque::borrowed(data),
    };
    match c.write(&args).await.expect("WRITE call") {
        Nfs3Result::Ok(_) => Ok(()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn read(c: &mut Conn, fh: &nfs_fh3, offset: u64, count: u32) -> NfsResult<(Vec<u8>, bool)> {
    let args = READ3args {
        file: fh.clone(),
        offset,
        count,
    };
    match c.read(&args).await.expect("READ call") {
        Nfs3Result::Ok(ok) => Ok((ok.data.0.to_vec(), ok.eof)),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn symlink(c: &mut Conn, dir: &nfs_fh3, name: &[u8], target: &[u8]) -> NfsResult<nfs_fh3> {
    let args = SYMLINK3args {
        where_: dirop(dir, name),
        symlink: symlinkdata3 {
            symlink_attributes: sattr3::default(),
            symlink_data: nfspath3::from(target.to_vec()),
        },
    };
    match c.symlink(&args).await.expect("SYMLINK call") {
        Nfs3Result::Ok(ok) => Ok(ok.obj.unwrap()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn readlink(c: &mut Conn, fh: &nfs_fh3) -> NfsResult<Vec<u8>> {
    let args = READLINK3args {
        symlink: fh.clone(),
    };
    match c.readlink(&args).await.expect("READLINK call") {
        Nfs3Result::Ok(ok) => Ok(ok.data.0.to_vec()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

async fn fsstat(c: &mut Conn, fh: &nfs_fh3) -> NfsResult<FSSTAT3resok> {
    let args = FSSTAT3args { fsroot: fh.clone() };
    match c.fsstat(&args).await.expect("FSSTAT call") {
        Nfs3Result::Ok(ok) => Ok(ok),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// Every READDIRPLUS page of `dir`, following cookies to EOF.
async fn readdirplus_pages(
    c: &mut Conn,
    dir: &nfs_fh3,
    maxcount: u32,
) -> NfsResult<Vec<Vec<entryplus3<'static>>>> {
    let (mut cookie, mut cookieverf) = (0, cookieverf3::default());
    let mut pages = Vec::new();
    loop {
        let args = READDIRPLUS3args {
            dir: dir.clone(),
            cookie,
            cookieverf,
            dircount: maxcount / 4,
            maxcount,
        };
        let ok = match c.readdirplus(&args).await.expect("READDIRPLUS call") {
            Nfs3Result::Ok(ok) => ok,
            Nfs3Result::Err((stat, _)) => return Err(stat),
        };
        let page = ok.reply.entries.0;
        assert!(!page.is_empty() || ok.reply.eof, "empty page before EOF");
        if let Some(last) = page.last() {
            cookie = last.cookie;
        }
        cookieverf = ok.cookieverf;
        pages.push(page);
        if ok.reply.eof {
            return Ok(pages);
        }
        assert!(pages.len() < 10_000, "READDIRPLUS never reaches EOF");
    }
}

/// Every READDIR entry of `dir` as (cookie, name), and the number of pages.
async fn readdir_all(
    c: &mut Conn,
    dir: &nfs_fh3,
    count: u32,
) -> NfsResult<(Vec<(u64, String)>, usize)> {
    let (mut cookie, mut cookieverf) = (0, cookieverf3::default());
    let (mut entries, mut pages) = (Vec::new(), 0);
    loop {
        let args = READDIR3args {
            dir: dir.clone(),
            cookie,
            cookieverf,
            count,
        };
        let ok = match c.readdir(&args).await.expect("READDIR call") {
            Nfs3Result::Ok(ok) => ok,
            Nfs3Result::Err((stat, _)) => return Err(stat),
        };
        pages += 1;
        for entry in ok.reply.entries.0 {
            cookie = entry.cookie;
            let name = String::from_utf8(entry.name.0.to_vec()).expect("utf-8");
            entries.push((entry.cookie, name));
        }
        cookieverf = ok.cookieverf;
        if ok.reply.eof {
            return Ok((entries, pages));
        }
        assert!(pages < 10_000, "READDIR never reaches EOF");
    }
}

#[tokio::test]
async fn mkdir_applies_the_requested_mode_and_owner_exactly() {
    within(async {
        let f = fixture().await;
        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        // 0o777 and 0o2775 would come out as 0o755 under the usual umask 022.
        for (i, mode) in [0o750, 0o777, 0o2775, 0o1777, 0o700, 0o000]
            .into_iter()
            .enumerate()
        {
            let name = format!("vol{i}");
            let (fh, attr) = mkdir(&mut c, &root, name.as_bytes(), with_mode(mode))
                .await
                .expect("mkdir");
            let path = f.data.join(&name);
            assert!(path.symlink_metadata().expect("stat").is_dir());
            assert_eq!(disk_mode(&path), mode, "{name} on disk");
            assert_eq!(attr.mode, mode, "{name} in the MKDIR reply");
            assert_eq!(attr.type_, ftype3::NF3DIR);
            assert_eq!(getattr(&mut c, &fh).await.expect("getattr").mode, mode);
        }
        mkdir(&mut c, &root, b"default", sattr3::default())
            .await
            .expect("mkdir without a mode");
        assert_eq!(disk_mode(&f.data.join("default")), DEFAULT_DIR_MODE);

        if is_root() {
            let attrs = sattr3 {
                mode: set_mode3::Some(0o750),
                uid: set_uid3::Some(1234),
                gid: set_gid3::Some(4321),
                ..sattr3::default()
            };
            let (_, attr) = mkdir(&mut c, &root, b"owned", attrs).await.expect("mkdir");
            let meta = f.data.join("owned").symlink_metadata().expect("stat");
            assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
            assert_eq!((attr.uid, attr.gid, attr.mode), (1234, 4321, 0o750));
        }
    })
    .await;
}

#[tokio::test]
async fn mkdir_of_an_existing_name_is_exist_and_changes_nothing() {
    within(async {
        let f = fixture().await;
        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        mkdir(&mut c, &root, b"a", with_mode(0o750))
            .await
            .expect("first mkdir");
        assert_eq!(
            mkdir(&mut c, &root, b"a", with_mode(0o777))
                .await
                .map(|_| ()),
            Err(nfsstat3::NFS3ERR_EXIST)
        );
        assert_eq!(
            disk_mode(&f.data.join("a")),
            0o750,
            "the existing dir is untouched"
        );

        std::fs::write(f.data.join("file"), b"x").expect("write file");
        assert_eq!(
            mkdir(&mut c, &root, b"file", with_mode(0o755))
                .await
                .map(|_| ()),
            Err(nfsstat3::NFS3ERR_EXIST)
        );
        assert!(
            f.data
                .join("file")
                .symlink_metadata()
                .expect("stat")
                .is_file()
        );
        assert_eq!(disk_names(&f.data), names(&["a", "file"]));
    })
    .await;
}

#[tokio::test]
async fn hostile_names_are_rejected_and_nothing_is_created_outside() {
    within(async {
        let f = fixture().await;
        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        let (a, _) = mkdir(&mut c, &root, b"a", with_mode(0o755))
            .await
            .expect("mkdir a");
        let long = [b'n'; 256];
        let hostile: [&[u8]; 9] = [
            b"..",
            b".",
            b"",
            b"a/b",
            b"../escape",
            b"/escape",
            b"a/../../escape",
            b"x\0y",
            &long,
        ];
        for name in hostile {
            let want = if name.len() > NAME_MAX {
                nfsstat3::NFS3ERR_NAMETOOLONG
            } else {
                nfsstat3::NFS3ERR_INVAL
            };
            let shown = String::from_utf8_lossy(name).into_owned();
            for dir in [&root, &a] {
                let mkdir = mkdir(&mut c, dir, name, with_mode(0o777)).await;
                assert_eq!(mkdir.map(|_| ()), Err(want), "MKDIR {shown:?}");
                assert_eq!(
                    lookup(&mut c, dir, name).await,
                    Err(want),
                    "LOOKUP {shown:?}"
                );
                let how = createhow3::UNCHECKED(sattr3::default());
                assert_eq!(
                    create(&mut c, dir, name, how).await,
                    Err(want),
                    "CREATE {shown:?}"
                );
                assert_eq!(rmdir(&mut c, dir, name).await, Err(want), "RMDIR {shown:?}");
                assert_eq!(
                    remove(&mut c, dir, name).await,
                    Err(want),
                    "REMOVE {shown:?}"
                );
                let link = symlink(&mut c, dir, name, b"/").await;
                assert_eq!(link, Err(want), "SYMLINK {shown:?}");
            }
            let renamed = rename(&mut c, (&root, b"a"), (&root, name)).await;
            assert_eq!(renamed, Err(want), "RENAME a -> {shown:?}");
            let renamed = rename(&mut c, (&root, name), (&root, b"z")).await;
            assert_eq!(renamed, Err(want), "RENAME {shown:?} -> z");
        }
        for path in ["/..", "/a/../..", "/../data"] {
            assert!(mount_path(&f.server, path).await.is_err(), "MOUNT {path}");
        }
        assert!(
            mount_path(&f.server, "/a").await.is_ok(),
            "MOUNT of a subdirectory"
        );

        assert_eq!(disk_names(f.tmp.path()), names(&["data"]));
        assert_eq!(disk_names(&f.data), names(&["a"]));
        assert_eq!(disk_names(&f.data.join("a")), names(&[]));
    })
    .await;
}

#[tokio::test]
async fn mount_of_a_sub_directory_never_follows_a_symlink() {
    within(async {
        let f = fixture().await;
        let outside = f.tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("secret")).unwrap();
        std::fs::create_dir_all(f.data.join("ns/vol")).unwrap();
        std::fs::write(f.data.join("ns/file"), "x").unwrap();
        disk_symlink(&outside, f.data.join("ns/escape")).unwrap();
        disk_symlink("vol", f.data.join("ns/alias")).unwrap();
        for path in [
            "/ns/escape",
            "/ns/escape/secret",
            "/ns/alias",
            "/ns/file",
            "/ns/none",
        ] {
            assert!(mount_path(&f.server, path).await.is_err(), "MOUNT {path}");
        }
        let mut c = mount_path(&f.server, "/ns/vol")
            .await
            .expect("MOUNT /ns/vol");
        let root = c.root_nfs_fh3();
        let attr = getattr(&mut c, &root).await.unwrap();
        assert_eq!(attr.type_, ftype3::NF3DIR);
        assert_eq!(
            attr.fileid,
            std::fs::metadata(f.data.join("ns/vol")).unwrap().ino()
        );
    })
    .await;
}

#[tokio::test]
async fn symlink_replies_carry_the_link_and_the_directory_before_and_after() {
    within(async {
        let f = fixture().await;
        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        let dir = mkdir(&mut c, &root, b"records", with_mode(0o700))
            .await
            .expect("mkdir")
            .0;
        let record = br#"{"capacity_bytes":1}"#;
        let owner = if is_root() {
            sattr3 {
                uid: set_uid3::Some(1234),
                gid: set_gid3::Some(4321),
                ..sattr3::default()
            }
        } else {
            sattr3::default()
        };
        let args = |name: &'static [u8], attrs: sattr3| SYMLINK3args {
            where_: dirop(&dir, name),
            symlink: symlinkdata3 {
                symlink_attributes: attrs,
                symlink_data: nfspath3::from(record.to_vec()),
            },
        };
        let ok = match c.symlink(&args(b"pvc-1", owner)).await.expect("SYMLINK") {
            Nfs3Result::Ok(ok) => ok,
            Nfs3Result::Err((stat, _)) => panic!("SYMLINK failed: {stat:?}"),
        };
        let on_disk = f.data.join("records/pvc-1");
        assert_eq!(
            std::fs::read_link(&on_disk)
                .expect("read_link")
                .as_os_str()
                .as_bytes(),
            record
        );
        let meta = on_disk.symlink_metadata().expect("stat");
        let Nfs3Option::Some(attr) = ok.obj_attributes else {
            panic!("no attributes in the SYMLINK reply");
        };
        assert_eq!(attr.type_, ftype3::NF3LNK);
        assert_eq!(attr.fileid, meta.ino());
        assert_eq!(attr.size, record.len() as u64);
        if is_root() {
            assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
            assert_eq!((attr.uid, attr.gid), (1234, 4321));
        }
        let Nfs3Option::Some(fh) = ok.obj else {
            panic!("no handle in the SYMLINK reply");
        };
        assert_eq!(readlink(&mut c, &fh).await.expect("readlink"), record);
        let (Nfs3Option::Some(before), Nfs3Option::Some(after)) =
            (ok.dir_wcc.before, ok.dir_wcc.after)
        else {
            panic!("no directory attributes in the SYMLINK reply");
        };
        assert_eq!(
            after.fileid,
            f.data.join("records").metadata().expect("stat").ino()
        );
        assert!(after.size >= before.size && after.mtime != nfstime3::default());

        // An existing name: EXIST, the first link untouched, nothing else made.
        match c
            .symlink(&args(b"pvc-1", sattr3::default()))
            .await
            .expect("SYMLINK")
        {
            Nfs3Result::Err((stat, _)) => assert_eq!(stat, nfsstat3::NFS3ERR_EXIST),
            Nfs3Result::Ok(_) => panic!("a second SYMLINK of one name succeeded"),
        }
        assert_eq!(
            std::fs::read_link(&on_disk)
                .expect("read_link")
                .as_os_str()
                .as_bytes(),
            record
        );
        // A hostile name: INVAL, nothing made.
        match c
            .symlink(&args(b"..", sattr3::default()))
            .await
            .expect("SYMLINK")
        {
            Nfs3Result::Err((stat, _)) => assert_eq!(stat, nfsstat3::NFS3ERR_INVAL),
            Nfs3Result::Ok(_) => panic!("SYMLINK named .. succeeded"),
        }
        assert_eq!(disk_names(&f.data.join("records")), names(&["pvc-1"]));
    })
    .await;
}

#[tokio::test]
async fn symlinks_are_served_as_symlinks_and_never_followed() {
    within(async {
        let f = fixture().await;
        let outside = f.tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).expect("outside dir");
        std::fs::write(outside.join("secret"), b"keep").expect("outside file");
        let secret_mode = disk_mode(&outside.join("secret"));
        let secret_uid = outside.join("secret").metadata().expect("stat").uid();
        disk_symlink(&outside, f.data.join("link_dir")).expect("symlink");
        disk_symlink(outside.join("secret"), f.data.join("link_file")).expect("symlink");

        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        let ld = lookup(&mut c, &root, b"link_dir")
            .await
            .expect("lookup link_dir");
        assert_eq!(
            getattr(&mut c, &ld).await.expect("getattr").type_,
            ftype3::NF3LNK
        );
        assert_eq!(
            readlink(&mut c, &ld).await.expect("readlink"),
            outside.as_os_str().as_bytes()
        );
        let notdir = Err(nfsstat3::NFS3ERR_NOTDIR);
        assert_eq!(
            mkdir(&mut c, &ld, b"x", with_mode(0o777)).await.map(|_| ()),
            notdir
        );
        let how = createhow3::UNCHECKED(sattr3::default());
        assert_eq!(create(&mut c, &ld, b"x", how).await.map(|_| ()), notdir);
        assert_eq!(lookup(&mut c, &ld, b"secret").await.map(|_| ()), notdir);
        assert_eq!(rmdir(&mut c, &ld, b"sub").await, notdir);
        assert_eq!(remove(&mut c, &ld, b"secret").await, notdir);
        assert_eq!(
            readdirplus_pages(&mut c, &ld, 4096).await.map(|_| ()),
            notdir
        );
        let entered = rename(&mut c, (&ld, b"secret"), (&root, b"stolen")).await;
        assert_eq!(entered, notdir);

        let lf = lookup(&mut c, &root, b"link_file")
            .await
            .expect("lookup link_file");
        let inval = Err(nfsstat3::NFS3ERR_INVAL);
        assert_eq!(write(&mut c, &lf, 0, b"pwned").await, inval);
        assert_eq!(read(&mut c, &lf, 0, 10).await.map(|_| ()), inval);
        let truncate = sattr3 {
            size: set_size3::Some(0),
            ..sattr3::default()
        };
        assert_eq!(setattr(&mut c, &lf, truncate).await.map(|_| ()), inval);
        setattr(&mut c, &lf, with_mode(0o777))
            .await
            .expect("mode of a symlink is ignored");
        if is_root() {
            let chown = sattr3 {
                uid: set_uid3::Some(1234),
                ..sattr3::default()
            };
            setattr(&mut c, &lf, chown)
                .await
                .expect("chown of the link itself");
            let link_meta = f.data.join("link_file").symlink_metadata().expect("lstat");
            assert_eq!(link_meta.uid(), 1234);
        }
        let how = createhow3::UNCHECKED(sattr3 {
            size: set_size3::Some(0),
            ..sattr3::default()
        });
        assert_eq!(
            create(&mut c, &root, b"link_file", how).await.map(|_| ()),
            Err(nfsstat3::NFS3ERR_EXIST)
        );
        remove(&mut c, &root, b"link_file")
            .await
            .expect("remove the link");
        remove(&mut c, &root, b"link_dir")
            .await
            .expect("remove the link");

        assert_eq!(
            std::fs::read(outside.join("secret")).expect("read"),
            b"keep"
        );
        assert_eq!(disk_mode(&outside.join("secret")), secret_mode);
        let secret_meta = outside.join("secret").metadata().expect("stat");
        assert_eq!(
            secret_meta.uid(),
            secret_uid,
            "the target's owner is untouched"
        );
        assert_eq!(disk_names(&outside), names(&["secret", "sub"]));
        assert_eq!(disk_names(&outside.join("sub")), names(&[]));
        assert_eq!(disk_names(&f.data), names(&[]));
    })
    .await;
}

#[tokio::test]
async fn a_directory_swapped_for_a_symlink_makes_handles_below_it_stale() {
    within(async {
        let f = fixture().await;
        let outside = f.tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).expect("outside dir");
        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        let (d, _) = mkdir(&mut c, &root, b"d", with_mode(0o755))
            .await
            .expect("mkdir d");
        let (sub, _) = mkdir(&mut c, &d, b"sub", with_mode(0o755))
            .await
            .expect("mkdir sub");

        std::fs::rename(f.data.join("d"), f.data.join("d.real")).expect("rename");
        disk_symlink(&outside, f.data.join("d")).expect("symlink");

        let stale = Err(nfsstat3::NFS3ERR_STALE);
        assert_eq!(getattr(&mut c, &sub).await.map(|_| ()), stale);
        assert_eq!(
            mkdir(&mut c, &sub, b"pwn", with_mode(0o777))
                .await
                .map(|_| ()),
            stale
        );
        let how = createhow3::UNCHECKED(sattr3::default());
        assert_eq!(create(&mut c, &sub, b"pwn", how).await.map(|_| ()), stale);
        assert_eq!(
            readdirplus_pages(&mut c, &sub, 4096).await.map(|_| ()),
            stale
        );
        assert_eq!(
            setattr(&mut c, &sub, with_mode(0o777)).await.map(|_| ()),
            stale
        );
        assert_eq!(rmdir(&mut c, &d, b"sub").await, stale);

        assert_eq!(disk_names(&outside.join("sub")), names(&[]));
        assert_eq!(disk_mode(&outside.join("sub")), 0o755);
        assert!(f.data.join("d.real/sub").is_dir());
    })
    .await;
}

#[tokio::test]
async fn rmdir_remove_and_rename_follow_rfc_1813() {
    within(async {
        let f = fixture().await;
        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        let (a, _) = mkdir(&mut c, &root, b"a", with_mode(0o755))
            .await
            .expect("mkdir a");
        let (full, _) = mkdir(&mut c, &root, b"full", with_mode(0o755))
            .await
            .expect("mkdir");
        mkdir(&mut c, &full, b"child", with_mode(0o755))
            .await
            .expect("mkdir child");
        let how = createhow3::UNCHECKED(with_mode(0o644));
        create(&mut c, &root, b"f", how).await.expect("create f");

        assert_eq!(
            rmdir(&mut c, &root, b"f").await,
            Err(nfsstat3::NFS3ERR_NOTDIR)
        );
        assert_eq!(
            remove(&mut c, &root, b"a").await,
            Err(nfsstat3::NFS3ERR_ISDIR)
        );
        assert_eq!(
            rmdir(&mut c, &root, b"full").await,
            Err(nfsstat3::NFS3ERR_NOTEMPTY)
        );
        assert_eq!(
            rmdir(&mut c, &root, b"missing").await,
            Err(nfsstat3::NFS3ERR_NOENT)
        );
        assert_eq!(
            remove(&mut c, &root, b"missing").await,
            Err(nfsstat3::NFS3ERR_NOENT)
        );

        rename(&mut c, (&root, b"a"), (&root, b"b"))
            .await
            .expect("rename a -> b");
        assert_eq!(disk_names(&f.data), names(&["b", "f", "full"]));
        // The handle follows the directory to its new name.
        mkdir(&mut c, &a, b"inside", with_mode(0o755))
            .await
            .expect("mkdir in moved dir");
        assert!(f.data.join("b/inside").is_dir());

        let exist = Err(nfsstat3::NFS3ERR_EXIST);
        assert_eq!(rename(&mut c, (&root, b"b"), (&root, b"full")).await, exist);
        assert_eq!(rename(&mut c, (&root, b"f"), (&root, b"full")).await, exist);
        assert_eq!(rename(&mut c, (&root, b"b"), (&root, b"f")).await, exist);
        assert!(
            f.data.join("full/child").is_dir(),
            "a non-empty dir is never clobbered"
        );
        assert!(f.data.join("b/inside").is_dir());
        assert!(f.data.join("f").is_file());
        let into_itself = rename(&mut c, (&root, b"b"), (&a, b"deeper")).await;
        assert_eq!(into_itself, Err(nfsstat3::NFS3ERR_INVAL));
        let missing = rename(&mut c, (&root, b"nope"), (&root, b"x")).await;
        assert_eq!(missing, Err(nfsstat3::NFS3ERR_NOENT));
        rename(&mut c, (&root, b"b"), (&root, b"b"))
            .await
            .expect("rename to itself");

        mkdir(&mut c, &root, b"empty", with_mode(0o700))
            .await
            .expect("mkdir empty");
        rename(&mut c, (&root, b"b"), (&root, b"empty"))
            .await
            .expect("over an empty dir");
        assert!(f.data.join("empty/inside").is_dir());
        assert_eq!(getattr(&mut c, &a).await.expect("getattr").mode, 0o755);

        std::fs::write(f.data.join("h"), b"old").expect("write h");
        rename(&mut c, (&root, b"f"), (&root, b"h"))
            .await
            .expect("file over file");
        assert_eq!(std::fs::read(f.data.join("h")).expect("read"), b"");

        assert_eq!(
            rmdir(&mut c, &root, b"empty").await,
            Err(nfsstat3::NFS3ERR_NOTEMPTY)
        );
        rmdir(&mut c, &a, b"inside").await.expect("rmdir inside");
        rmdir(&mut c, &root, b"empty").await.expect("rmdir empty");
        assert_eq!(
            getattr(&mut c, &a).await.map(|_| ()),
            Err(nfsstat3::NFS3ERR_STALE)
        );
        remove(&mut c, &root, b"h").await.expect("remove h");
        assert_eq!(disk_names(&f.data), names(&["full"]));
    })
    .await;
}

#[tokio::test]
async fn readdir_pages_through_a_large_directory() {
    within(async {
        let f = fixture().await;
        let mut expected = BTreeSet::new();
        for i in 0..250 {
            let name = format!("entry-{i:03}");
            std::fs::create_dir(f.data.join(&name)).expect("create dir");
            expected.insert(name);
        }
        std::fs::write(f.data.join("a-file"), b"x").expect("write");
        expected.insert("a-file".to_owned());

        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        let pages = readdirplus_pages(&mut c, &root, 4096)
            .await
            .expect("readdirplus");
        assert!(
            pages.len() > 3,
            "{} pages: paging not exercised",
            pages.len()
        );
        let entries: Vec<_> = pages.into_iter().flatten().collect();
        let listed: Vec<String> = entries
            .iter()
            .map(|e| String::from_utf8(e.name.0.to_vec()).expect("utf-8"))
            .collect();
        assert_eq!(listed.len(), expected.len(), "no entry twice");
        assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), expected);
        let cookies: Vec<u64> = entries.iter().map(|e| e.cookie).collect();
        assert!(cookies.windows(2).all(|w| w[0] < w[1]), "cookies increase");

        // Handles and attributes come with the entries.
        for entry in entries.iter().take(5) {
            let Nfs3Option::Some(fh) = &entry.name_handle else {
                panic!("entry without a handle");
            };
            let attr = getattr(&mut c, fh).await.expect("getattr");
            assert_eq!(attr.fileid, entry.fileid);
        }

        // Stable while the directory doesn't change, and READDIR agrees.
        let again: Vec<_> = readdirplus_pages(&mut c, &root, 8192)
            .await
            .expect("readdirplus")
            .into_iter()
            .flatten()
            .map(|e| e.cookie)
            .collect();
        assert_eq!(again, cookies);
        let (plain, plain_pages) = readdir_all(&mut c, &root, 1024).await.expect("readdir");
        assert!(plain_pages > 3, "{plain_pages} READDIR pages");
        let plain_cookies: Vec<u64> = plain.iter().map(|(cookie, _)| *cookie).collect();
        assert_eq!(plain_cookies, cookies);
        assert_eq!(
            plain.iter().map(|(_, n)| n).cloned().collect::<Vec<_>>(),
            listed
        );
    })
    .await;
}

#[tokio::test]
async fn fsstat_reports_the_real_file_system() {
    within(async {
        let f = fixture().await;
        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        let got = fsstat(&mut c, &root).await.expect("fsstat");
        let real = nix::sys::statvfs::statvfs(&f.data).expect("statvfs");
        let frsize = real.fragment_size();
        assert_eq!(got.tbytes, real.blocks() * frsize);
        assert_eq!(got.tfiles, real.files());
        assert!(got.abytes <= got.fbytes && got.fbytes <= got.tbytes);
        assert!(got.afiles <= got.tfiles);
        let available = real.blocks_available() * frsize;
        assert!(
            got.abytes.abs_diff(available) < 256 << 20,
            "abytes {} vs statvfs {available}",
            got.abytes
        );
        let (sub, _) = mkdir(&mut c, &root, b"sub", with_mode(0o755))
            .await
            .expect("mkdir");
        assert_eq!(
            fsstat(&mut c, &sub).await.expect("fsstat sub").tbytes,
            got.tbytes
        );
    })
    .await;
}

#[tokio::test]
async fn handles_of_an_earlier_server_are_stale_and_a_restart_serves_the_same_dir() {
    within(async {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let first = start(&data).await;
        let mut c = mount(&first).await;
        let old_root = c.root_nfs_fh3();
        let (keep, _) = mkdir(&mut c, &old_root, b"keep", with_mode(0o750))
            .await
            .expect("mkdir");
        let how = createhow3::UNCHECKED(with_mode(0o600));
        let file = create(&mut c, &keep, b"file", how).await.expect("create");
        write(&mut c, &file, 0, b"hello").await.expect("write");
        drop(c);
        first.shutdown().await;

        // The same port number may be reused; the generation still differs.
        let second = start(&data).await;
        let mut c = mount(&second).await;
        let stale = Err(nfsstat3::NFS3ERR_STALE);
        assert_eq!(getattr(&mut c, &old_root).await.map(|_| ()), stale);
        assert_eq!(getattr(&mut c, &keep).await.map(|_| ()), stale);
        assert_eq!(lookup(&mut c, &old_root, b"keep").await.map(|_| ()), stale);
        assert_eq!(read(&mut c, &file, 0, 5).await.map(|_| ()), stale);
        // Answered by the relay, not by nfs3_server: the same rule.
        assert_eq!(
            mkdir(&mut c, &keep, b"x", with_mode(0o755))
                .await
                .map(|_| ()),
            stale
        );
        assert_eq!(rmdir(&mut c, &old_root, b"keep").await, stale);
        assert_eq!(fsstat(&mut c, &old_root).await.map(|_| ()), stale);
        assert!(!data.join("keep/x").exists());

        let root = c.root_nfs_fh3();
        assert_ne!(root, old_root);
        let keep = lookup(&mut c, &root, b"keep").await.expect("lookup keep");
        assert_eq!(getattr(&mut c, &keep).await.expect("getattr").mode, 0o750);
        let file = lookup(&mut c, &keep, b"file").await.expect("lookup file");
        assert_eq!(
            read(&mut c, &file, 0, 100).await.expect("read"),
            (b"hello".to_vec(), true)
        );
        second.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn files_can_be_created_written_read_and_changed() {
    within(async {
        let f = fixture().await;
        let mut c = mount(&f.server).await;
        let root = c.root_nfs_fh3();
        let how = createhow3::UNCHECKED(with_mode(0o666));
        let file = create(&mut c, &root, b"f", how).await.expect("create");
        assert_eq!(disk_mode(&f.data.join("f")), 0o666, "no umask");
        let guarded = createhow3::GUARDED(sattr3::default());
        assert_eq!(
            create(&mut c, &root, b"f", guarded).await,
            Err(nfsstat3::NFS3ERR_EXIST)
        );

        write(&mut c, &file, 0, b"hello world")
            .await
            .expect("write");
        assert_eq!(
            std::fs::read(f.data.join("f")).expect("read"),
            b"hello world"
        );
        let all = read(&mut c, &file, 0, 100).await.expect("read");
        assert_eq!(all, (b"hello world".to_vec(), true));
        assert_eq!(
            read(&mut c, &file, 0, 5).await.expect("read"),
            (b"hello".to_vec(), false)
        );
        assert_eq!(
            read(&mut c, &file, 6, 5).await.expect("read"),
            (b"world".to_vec(), true)
        );
        assert_eq!(
            read(&mut c, &file, 50, 5).await.expect("read"),
            (Vec::new(), true)
        );

        let truncate = sattr3 {
            size: set_size3::Some(5),
            ..sattr3::default()
        };
        assert_eq!(
            setattr(&mut c, &file, truncate)
                .await
                .expect("truncate")
                .size,
            5
        );
        assert_eq!(std::fs::read(f.data.join("f")).expect("read"), b"hello");

        let times = sattr3 {
            atime: set_atime::SET_TO_CLIENT_TIME(nfstime3 {
                seconds: 2_000_000,
                nseconds: 0,
            }),
            mtime: set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
                seconds: 1_000_000,
                nseconds: 5,
            }),
            ..sattr3::default()
        };
        let attr = setattr(&mut c, &file, times).await.expect("set times");
        assert_eq!((attr.mtime.seconds, attr.mtime.nseconds), (1_000_000, 5));
        let meta = f.data.join("f").symlink_metadata().expect("stat");
        assert_eq!((meta.mtime(), meta.atime()), (1_000_000, 2_000_000));

        if is_root() {
            let owner_and_mode = sattr3 {
                mode: set_mode3::Some(0o4755),
                uid: set_uid3::Some(1234),
                gid: set_gid3::Some(4321),
                ..sattr3::default()
            };
            setattr(&mut c, &file, owner_and_mode)
                .await
                .expect("chown + chmod");
            let meta = f.data.join("f").symlink_metadata().expect("stat");
            assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
            assert_eq!(
                meta.mode() & 0o7777,
                0o4755,
                "set-uid kept: mode after owner"
            );
        }

        // SETATTR on the exported directory itself.
        setattr(&mut c, &root, with_mode(0o751))
            .await
            .expect("chmod the export");
        assert_eq!(disk_mode(&f.data), 0o751);

        let link = symlink(&mut c, &root, b"l", b"f").await.expect("symlink");
        assert_eq!(readlink(&mut c, &link).await.expect("readlink"), b"f");
        let on_disk = std::fs::read_link(f.data.join("l")).expect("read_link");
        assert_eq!(on_disk, Path::new("f"));
        assert_eq!(readlink(&mut c, &file).await, Err(nfsstat3::NFS3ERR_INVAL));
        remove(&mut c, &root, b"l").await.expect("remove link");
        assert!(f.data.join("f").is_file());

        let verf = createverf3(*b"verifier");
        let exclusive = create(&mut c, &root, b"x", createhow3::EXCLUSIVE(verf))
            .await
            .expect("exclusive create");
        let retransmitted = create(&mut c, &root, b"x", createhow3::EXCLUSIVE(verf))
            .await
            .expect("same verifier");
        assert_eq!(exclusive, retransmitted);
        let other = createhow3::EXCLUSIVE(createverf3(*b"another!"));
        assert_eq!(
            create(&mut c, &root, b"x", other).await,
            Err(nfsstat3::NFS3ERR_EXIST)
        );
    })
    .await;
}

#[tokio::test]
async fn concurrent_connections_each_get_their_answers() {
    within(async {
        let f = fixture().await;
        let mut tasks = JoinSet::new();
        for worker in 0..4 {
            let addr = f.server.local_addr();
            tasks.spawn(async move {
                // Explicit ports this time, no portmap.
                let mut c = Nfs3ConnectionBuilder::new(TokioConnector, addr.ip().to_string(), "/")
                    .mount_port(addr.port())
                    .nfs3_port(addr.port())
                    .connect_from_privileged_port(false)
                    .credential(opaque_auth::auth_unix(&auth_unix::default()))
                    .mount()
                    .await
                    .expect("mount");
                let root = c.root_nfs_fh3();
                for i in 0..50 {
                    let name = format!("w{worker}-{i}");
                    let (fh, attr) = mkdir(&mut c, &root, name.as_bytes(), with_mode(0o700))
                        .await
                        .expect("mkdir");
                    assert_eq!(attr.mode, 0o700);
                    let looked_up = lookup(&mut c, &root, name.as_bytes())
                        .await
                        .expect("lookup");
                    assert_eq!(looked_up, fh);
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("worker");
        }
        assert_eq!(disk_names(&f.data).len(), 200);
    })
    .await;
}
