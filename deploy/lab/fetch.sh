#!/usr/bin/env bash
# Fetch Apache Kafka and Apache Cassandra from Maven Central for the lab:
# `mvn dependency:copy-dependencies` on the poms under deploy/lab/maven into
# $CHAOS_LAB_HOME/jars/{kafka,cassandra} (default /var/lib/chaos-lab).
# Idempotent: a directory whose stamp matches its pom is kept.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
home="${CHAOS_LAB_HOME:-/var/lib/chaos-lab}"
command -v mvn >/dev/null || { echo "mvn not found: install Maven (Debian: apt-get install maven)" >&2; exit 1; }
command -v java >/dev/null || { echo "java not found: install a JDK 17 (Debian: apt-get install openjdk-17-jdk-headless)" >&2; exit 1; }
for server in kafka cassandra; do
  pom="$here/maven/$server/pom.xml"
  dest="$home/jars/$server"
  stamp="$(sha256sum "$pom" | cut -d' ' -f1)"
  if [ -f "$dest/.stamp" ] && [ "$(cat "$dest/.stamp")" = "$stamp" ]; then
    echo "$server: jars up to date in $dest" >&2
    continue
  fi
  echo "$server: fetching from Maven Central into $dest ..." >&2
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  if ! mvn -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$dest.tmp" -DincludeScope=runtime >"$dest.mvn.log" 2>&1; then
    tail -30 "$dest.mvn.log" >&2
    echo "$server: mvn failed (full log: $dest.mvn.log)" >&2
    exit 1
  fi
  rm -f "$dest.mvn.log"
  echo "$stamp" > "$dest.tmp/.stamp"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "$server: $(ls "$dest" | grep -c '\.jar$') jars" >&2
done
