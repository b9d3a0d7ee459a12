//! `peer_country`: the ISO 3166 code of a peer address from a MaxMind
//! database (GeoLite2/GeoIP2 Country or City, or any database with the same
//! `country.iso_code` field), read into memory once at start.
use std::{fmt, net::IpAddr, path::Path};

use maxminddb::{Reader, geoip2};

pub struct GeoIp {
    reader: Reader<Vec<u8>>,
}

impl fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoIp").field("database_type", &self.reader.metadata().database_type).finish()
    }
}

impl GeoIp {
    /// Opens and checks the database; the error names the file and what a
    /// right one is.
    pub fn open(path: &Path) -> Result<Self, String> {
        let what = "give a MaxMind database file, such as GeoLite2-Country.mmdb";
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read --geoip-db {}: {e} ({what})", path.display()))?;
        let reader = Reader::from_source(bytes)
            .map_err(|e| format!("--geoip-db {} is not a MaxMind database: {e} ({what})", path.display()))?;
        Ok(GeoIp { reader })
    }

    /// The country code, or `None` when the database has no country for it
    /// (private and loopback addresses, unassigned space).
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        let record: geoip2::Country = self.reader.lookup(ip).ok()?.decode().ok()??;
        // Where MaxMind places no user population, the registration country
        // is the best answer it has.
        record.country.iso_code.or(record.registered_country.iso_code).map(str::to_owned)
    }
}
