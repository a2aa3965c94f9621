//! The agent's serving certificate: self-signed, made at start for the advertised host. The agent publishes it
//! in its BerthNode status and the controller pins it, so no cluster CA is involved.

use std::net::IpAddr;

use anyhow::Result;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};

pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn self_signed(node: &str, host: &str) -> Result<ServingCert> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![match host.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(host.try_into()?),
    }];
    params.distinguished_name.push(DnType::CommonName, format!("berth-agent {node}"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(ServingCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}
