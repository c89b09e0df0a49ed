// A local S3 server for the tests (tests/support/s3rver.py starts it): s3rver on 127.0.0.1,
// an OS-chosen port, path-style buckets, objects under --directory. It prints
// "listening <port>" once it accepts requests, and stops on SIGTERM.
// Usage: node serve.js <directory>
'use strict'

const S3rver = require('@20minutes/s3rver')

const directory = process.argv[2]
if (!directory) {
  console.error('usage: node serve.js <directory>')
  process.exit(2)
}

const server = new S3rver({
  address: '127.0.0.1',
  port: 0,
  directory,
  silent: false,
  vhostBuckets: false,
  allowMismatchedSignatures: false,
})

server.run().then(
  (address) => console.log(`listening ${address.port}`),
  (err) => {
    console.error(err)
    process.exit(1)
  }
)
process.on('SIGTERM', () => server.close().finally(() => process.exit(0)))
