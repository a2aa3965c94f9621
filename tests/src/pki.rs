//! The test bed's certificates and keys: one CA, one serving certificate for every server of the bed, an admin
//! client certificate (group system:masters) and the service-account signing key pair.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// Paths of the PEM files written by [`Pki::write`].
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub sa_private_key: PathBuf,
    pub sa_public_key: PathBuf,
}

/// The in-cluster name and service IP of the API server, plus 10.0.2.2: what a qemu guest with user networking
/// calls the host's 127.0.0.1.
const EXTRA_SERVER_NAMES: &[&str] = &[
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "10.0.0.1",
    "10.0.2.2",
];

/// A client certificate's subject: the user (CN) and groups (O) the API server reads from it.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub file_stem: String,
    pub user: String,
    pub groups: Vec<String>,
}

impl Pki {
    /// Writes a fresh PKI into `dir`; the serving certificate covers 127.0.0.1 and every address in `server_ips`.
    pub fn write(dir: &Path, server_ips: &[Ipv4Addr]) -> Result<Pki> {
        Pki::write_with_clients(dir, server_ips, &[])
    }

    /// [`Pki::write`] plus a client certificate for each [`ClientIdentity`], at [`Pki::client`]'s paths.
    pub fn write_with_clients(dir: &Path, server_ips: &[Ipv4Addr], clients: &[ClientIdentity]) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let pki = Pki {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            serving_cert: dir.join("serving.crt"),
            serving_key: dir.join("serving.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_private_key: dir.join("sa.key"),
            sa_public_key: dir.join("sa.pub"),
        };

        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "berth-testbed-ca");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key)?;
        write(&pki.ca_cert, &ca_cert.pem())?;
        write(&pki.ca_key, &ca_key.serialize_pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let mut names: Vec<String> = EXTRA_SERVER_NAMES.iter().map(|s| s.to_string()).collect();
        names.push(Ipv4Addr::LOCALHOST.to_string());
        names.extend(server_ips.iter().map(|ip| IpAddr::V4(*ip).to_string()));
        let mut serving = CertificateParams::new(names)?;
        serving.distinguished_name.push(DnType::CommonName, "berth-testbed-server");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        write(&pki.serving_cert, &serving.signed_by(&serving_key, &issuer)?.pem())?;
        write(&pki.serving_key, &serving_key.serialize_pem())?;

        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin.distinguished_name.push(DnType::CommonName, "berth-testbed-admin");
        admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_key = KeyPair::generate()?;
        write(&pki.admin_cert, &admin.signed_by(&admin_key, &issuer)?.pem())?;
        write(&pki.admin_key, &admin_key.serialize_pem())?;

        for client in clients {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, client.user.clone());
            for group in &client.groups {
                params.distinguished_name.push(DnType::OrganizationName, group.clone());
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate()?;
            let (cert_path, key_path) = pki.client(&client.file_stem);
            write(&cert_path, &params.signed_by(&key, &issuer)?.pem())?;
            write(&key_path, &key.serialize_pem())?;
        }

        // ES256 service-account tokens: kube-apiserver signs with the private key, verifies with the public one.
        let sa = KeyPair::generate()?;
        write(&pki.sa_private_key, &sa.serialize_pem())?;
        write(&pki.sa_public_key, &sa.public_key_pem())?;
        Ok(pki)
    }

    /// The certificate and key of the client identity written as `file_stem` by [`Pki::write_with_clients`].
    pub fn client(&self, file_stem: &str) -> (PathBuf, PathBuf) {
        let dir = self.ca_cert.parent().expect("the CA certificate is in the PKI directory");
        (dir.join(format!("{file_stem}.crt")), dir.join(format!("{file_stem}.key")))
    }

    /// The admin identity as reqwest wants it: certificate and key in one PEM.
    pub fn admin_identity_pem(&self) -> Result<Vec<u8>> {
        let mut pem = std::fs::read(&self.admin_cert)?;
        pem.extend(std::fs::read(&self.admin_key)?);
        Ok(pem)
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}
