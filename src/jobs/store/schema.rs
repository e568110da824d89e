//! The one schema history of the jobs database (jobs, results, studies, observers, work
//! items): versions are applied in order by `rusqlite_migration`, each once, under a file lock
//! so that two servers starting together on one database never both apply one.

use rusqlite_migration::{M, Migrations};

/// Schema versions, oldest first; a new version is a new entry, never an edit.
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            total INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            started_ms INTEGER,
            finished_ms INTEGER,
            error TEXT,
            resumed INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE results (
            job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            model TEXT NOT NULL,
            method TEXT NOT NULL,
            file TEXT NOT NULL,
            record TEXT NOT NULL,
            png TEXT,
            success INTEGER,
            created_ms INTEGER NOT NULL,
            PRIMARY KEY (job_id, model, method, file)
        );",
        ),
        // v2: human studies (`crate::study`) made from finished jobs.
        M::up(
            "CREATE TABLE studies (
            id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs(id),
            name TEXT NOT NULL,
            model TEXT NOT NULL,
            categories TEXT NOT NULL,
            groups INTEGER NOT NULL,
            refs INTEGER NOT NULL,
            created_ms INTEGER NOT NULL
        );
        CREATE TABLE puzzles (
            study_id TEXT NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
            id INTEGER NOT NULL,
            source TEXT NOT NULL,
            category TEXT NOT NULL,
            image TEXT NOT NULL,
            label TEXT NOT NULL,
            label_wnid TEXT,
            truth INTEGER NOT NULL,
            animal INTEGER NOT NULL,
            grp INTEGER NOT NULL,
            PRIMARY KEY (study_id, id)
        );
        CREATE TABLE study_references (
            study_id TEXT NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
            label_wnid TEXT NOT NULL,
            image TEXT NOT NULL,
            source TEXT NOT NULL,
            PRIMARY KEY (study_id, label_wnid, image)
        );
        CREATE TABLE observers (
            token TEXT PRIMARY KEY,
            study_id TEXT NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            grp INTEGER NOT NULL,
            seed INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            UNIQUE (study_id, name)
        );
        CREATE TABLE answers (
            token TEXT NOT NULL REFERENCES observers(token) ON DELETE CASCADE,
            puzzle INTEGER NOT NULL,
            correct INTEGER NOT NULL,
            answered_ms INTEGER NOT NULL,
            PRIMARY KEY (token, puzzle)
        );",
        ),
        // v3: observer links expire and are revoked one by one (`crate::study`); links made
        // before expire a week (the default TTL) after they were made.
        M::up(
            "ALTER TABLE observers ADD COLUMN expires_ms INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE observers ADD COLUMN revoked_ms INTEGER;
        UPDATE observers SET expires_ms = created_ms + 604800000;",
        ),
        // v4: each answer's time from its picture's display to the answer (None before), the
        // seed the study's sources were shuffled with (None before: alphabetical), and the
        // puzzles indexed by group, so an observer's group is counted without a scan.
        M::up(
            "ALTER TABLE answers ADD COLUMN elapsed_ms INTEGER;
        ALTER TABLE studies ADD COLUMN seed INTEGER;
        CREATE INDEX puzzles_by_group ON puzzles (study_id, grp);",
        ),
        // v5: a study's design (one group per observer, or every group in sequence), the
        // reference set it was made with (NULL: none; for a study made before v5, its references
        // came from the job's folder and keep doing so), and whether each answer's observer
        // opened the reference pictures (NULL: not said, or answered before v5).
        M::up(
            "ALTER TABLE studies ADD COLUMN design TEXT NOT NULL DEFAULT 'one_group';
        ALTER TABLE studies ADD COLUMN reference_images TEXT;
        ALTER TABLE answers ADD COLUMN references_opened INTEGER;",
        ),
        // v6: work shared by several servers on one database. A job is split into work items
        // (one per image × method × model, and one for its report, `blocked` until the attacks
        // are done) that servers claim with a lease they renew; `instances` are the servers
        // working now. A job made before v6 gets its items when a server first sees it.
        M::up(
            "CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_ms INTEGER NOT NULL,
            heartbeat_ms INTEGER NOT NULL
        );
        CREATE TABLE work_items (
            id INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            model TEXT NOT NULL,
            method TEXT NOT NULL,
            file TEXT NOT NULL,
            seq INTEGER NOT NULL,
            job_created_ms INTEGER NOT NULL,
            state TEXT NOT NULL,
            owner TEXT,
            lease_token INTEGER NOT NULL DEFAULT 0,
            lease_until INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            done_by TEXT,
            done_ms INTEGER,
            UNIQUE (job_id, kind, model, method, file)
        );
        CREATE INDEX work_pending ON work_items (job_created_ms, job_id, seq) WHERE state = 'pending';
        CREATE INDEX work_leased ON work_items (owner, lease_until) WHERE state = 'leased';",
        ),
    ])
}

/// The same history in PostgreSQL's SQL, version for version (`labelfool_schema` records what
/// was applied). Integers are `BIGINT` (SQLite's are 64-bit), flags `BOOLEAN`; key text columns
/// collate as "C", so that results sort as SQLite's binary collation sorts them; observers get
/// an identity column where SQLite's queries break ties on `rowid`.
pub const POSTGRES: [&str; 6] = [
    r#"CREATE TABLE jobs (
        id TEXT COLLATE "C" PRIMARY KEY,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        total BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        started_ms BIGINT,
        finished_ms BIGINT,
        error TEXT,
        resumed BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE results (
        job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        model TEXT COLLATE "C" NOT NULL,
        method TEXT COLLATE "C" NOT NULL,
        file TEXT COLLATE "C" NOT NULL,
        record TEXT NOT NULL,
        png TEXT,
        success BOOLEAN,
        created_ms BIGINT NOT NULL,
        PRIMARY KEY (job_id, model, method, file)
    );"#,
    r#"CREATE TABLE studies (
        id TEXT COLLATE "C" PRIMARY KEY,
        job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs(id),
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        categories TEXT NOT NULL,
        "groups" BIGINT NOT NULL,
        refs BIGINT NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE puzzles (
        study_id TEXT COLLATE "C" NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
        id BIGINT NOT NULL,
        source TEXT NOT NULL,
        category TEXT NOT NULL,
        image TEXT NOT NULL,
        label TEXT NOT NULL,
        label_wnid TEXT,
        truth BOOLEAN NOT NULL,
        animal BOOLEAN NOT NULL,
        grp BIGINT NOT NULL,
        PRIMARY KEY (study_id, id)
    );
    CREATE TABLE study_references (
        study_id TEXT COLLATE "C" NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
        label_wnid TEXT COLLATE "C" NOT NULL,
        image TEXT COLLATE "C" NOT NULL,
        source TEXT NOT NULL,
        PRIMARY KEY (study_id, label_wnid, image)
    );
    CREATE TABLE observers (
        token TEXT PRIMARY KEY,
        study_id TEXT COLLATE "C" NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
        name TEXT COLLATE "C" NOT NULL,
        grp BIGINT NOT NULL,
        seed BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        seq BIGINT GENERATED ALWAYS AS IDENTITY,
        UNIQUE (study_id, name)
    );
    CREATE TABLE answers (
        token TEXT NOT NULL REFERENCES observers(token) ON DELETE CASCADE,
        puzzle BIGINT NOT NULL,
        correct BOOLEAN NOT NULL,
        answered_ms BIGINT NOT NULL,
        PRIMARY KEY (token, puzzle)
    );"#,
    "ALTER TABLE observers ADD COLUMN expires_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE observers ADD COLUMN revoked_ms BIGINT;
    UPDATE observers SET expires_ms = created_ms + 604800000;",
    "ALTER TABLE answers ADD COLUMN elapsed_ms BIGINT;
    ALTER TABLE studies ADD COLUMN seed BIGINT;
    CREATE INDEX puzzles_by_group ON puzzles (study_id, grp);",
    "ALTER TABLE studies ADD COLUMN design TEXT NOT NULL DEFAULT 'one_group';
    ALTER TABLE studies ADD COLUMN reference_images TEXT;
    ALTER TABLE answers ADD COLUMN references_opened BOOLEAN;",
    r#"CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid BIGINT NOT NULL,
        started_ms BIGINT NOT NULL,
        heartbeat_ms BIGINT NOT NULL
    );
    CREATE TABLE work_items (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        model TEXT COLLATE "C" NOT NULL,
        method TEXT COLLATE "C" NOT NULL,
        file TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        job_created_ms BIGINT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT,
        lease_token BIGINT NOT NULL DEFAULT 0,
        lease_until BIGINT,
        attempts BIGINT NOT NULL DEFAULT 0,
        done_by TEXT,
        done_ms BIGINT,
        UNIQUE (job_id, kind, model, method, file)
    );
    CREATE INDEX work_pending ON work_items (job_created_ms, job_id, seq) WHERE state = 'pending';
    CREATE INDEX work_leased ON work_items (owner, lease_until) WHERE state = 'leased';"#,
];
