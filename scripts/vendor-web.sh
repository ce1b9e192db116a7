#!/usr/bin/env bash
# Refreshes the dashboard's front-end libraries from npm: installs what
# apps/hospital/web/package-lock.json pins and copies the files the app
# embeds (include_str!) into apps/hospital/assets/vendor, with their licences.
# The copies are committed, so building the app needs neither npm nor the
# network; a test (web::tests) checks they are the version the lock pins.
set -euo pipefail
cd "$(dirname "$0")/.."
npm ci --prefix apps/hospital/web --no-audit --no-fund --loglevel=error
dist=apps/hospital/web/node_modules/uplot
cp "$dist/dist/uPlot.iife.min.js" "$dist/dist/uPlot.min.css" apps/hospital/assets/vendor/
cp "$dist/LICENSE" apps/hospital/assets/vendor/uPlot.LICENSE
echo "vendored uPlot $(node -p "require('./$dist/package.json').version")"
