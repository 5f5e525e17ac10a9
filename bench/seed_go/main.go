// Command seed-go is the seed's v2 tunnel ("A less worst VPN", 2023) rebuilt from its
// description, so that `pgvpn bench` compares pgvpn with the original design in its own
// language rather than with a Python rendering of it.
//
// What makes it the seed, kept on purpose:
//   - one goroutine per packet read from the TUN device, each doing its own INSERT ... RETURNING
//     id and then SELECT pg_notify(channel, id) as a second statement (two autocommit
//     transactions; concurrent commits reorder packets);
//   - a pgx pool of the library's default size (4), one of whose connections LISTENs;
//   - the receiver handles one notification at a time: SELECT the row by id, write it to the TUN;
//   - a plain TUN (no offload, MTU 1500), a 2000-byte read buffer, IPv4 only (packets not
//     starting with 0x45 are dropped, as the seed did).
//
// Only the wiring differs: flags instead of environment variables, and the TUN opened with an
// ioctl instead of the water package (which Debian does not ship).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"syscall"
	"unsafe"

	"github.com/jackc/pgx/v4/pgxpool"
)

const insertQuery = `INSERT INTO raw_packet (payload, sender) VALUES ($1, $2) RETURNING id`

// The id travels as the payload of a notification on the sender's own channel.
const notifyQuery = `SELECT pg_notify('raw_packet_ready:%s', '%d')`

const (
	tunSetIff = 0x400454ca
	iffTun    = 0x0001
	iffNoPi   = 0x1000
)

type ifreq struct {
	name  [16]byte
	flags uint16
	_     [22]byte
}

func openTun(name string) *os.File {
	fd, err := syscall.Open("/dev/net/tun", syscall.O_RDWR|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		log.Fatal(err)
	}
	var req ifreq
	copy(req.name[:], name)
	req.flags = iffTun | iffNoPi
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), tunSetIff,
		uintptr(unsafe.Pointer(&req))); errno != 0 {
		log.Fatalf("TUNSETIFF %s: %v", name, errno)
	}
	return os.NewFile(uintptr(fd), name)
}

func configure(name, localIP string) {
	for _, args := range [][]string{
		{"addr", "add", localIP + "/30", "dev", name},
		{"link", "set", "up", "dev", name},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			log.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
}

func readTun(ctx context.Context, tun *os.File, pool *pgxpool.Pool, localIP string) {
	for {
		packet := make([]byte, 2000)
		n, err := tun.Read(packet)
		if err != nil {
			log.Fatal(err)
		}
		go sendPacket(ctx, pool, packet[:n], localIP)
	}
}

func sendPacket(ctx context.Context, pool *pgxpool.Pool, packet []byte, localIP string) {
	if packet[0] != 0x45 {
		log.Printf("skipping non-IPv4 packet")
		return
	}
	var id int
	if err := pool.QueryRow(ctx, insertQuery, packet, localIP).Scan(&id); err != nil {
		log.Fatal(err)
	}
	if _, err := pool.Exec(ctx, fmt.Sprintf(notifyQuery, localIP, id)); err != nil {
		log.Fatal(err)
	}
}

func listen(ctx context.Context, pool *pgxpool.Pool, tun *os.File, peerIP string) {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, fmt.Sprintf(`LISTEN "raw_packet_ready:%s"`, peerIP)); err != nil {
		log.Fatal(err)
	}
	for {
		n, err := conn.Conn().WaitForNotification(ctx)
		if err != nil {
			log.Fatal(err)
		}
		var payload []byte
		err = pool.QueryRow(ctx, `SELECT payload FROM raw_packet WHERE id = $1`,
			n.Payload).Scan(&payload)
		if err != nil {
			log.Fatal(err)
		}
		if _, err := tun.Write(payload); err != nil {
			log.Fatal(err)
		}
	}
}

func main() {
	dsn := flag.String("dsn", os.Getenv("DATABASE_URL"), "PostgreSQL connection string")
	name := flag.String("tun", "postgres-vpn", "TUN device to create")
	localIP := flag.String("ip", os.Getenv("TUN_IP"), "this end's tunnel address (a /30)")
	peerIP := flag.String("peer", os.Getenv("TUN_PEER"), "the other end's tunnel address")
	flag.Parse()

	tun := openTun(*name)
	configure(*name, *localIP)
	ctx := context.Background()
	pool, err := pgxpool.Connect(ctx, *dsn)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	log.Printf("%s up: %s, listening for %s", *name, *localIP, *peerIP)
	go readTun(ctx, tun, pool, *localIP)
	listen(ctx, pool, tun, *peerIP)
}
